"""The commands: each checks its input, applies `--backend`, then calls the
library (`keras_bidora.recipes` for training) and writes its outputs.

Keras is imported only by `use_backend` (Keras reads `KERAS_BACKEND` once,
at import), and the library modules that need it are imported inside the
commands, after it.
"""

import contextlib
import json
import os
import sys
import time
import warnings

import numpy as np

from keras_bidora import config
from keras_bidora.cli import generation
from keras_bidora.cli import inputs
from keras_bidora.cli import outputs
from keras_bidora.cli.parser import UsageError
from keras_bidora.data import preprocessing
from keras_bidora.data import task_spec as task_spec_lib

_REEXEC_FLAG = "_KERAS_BIDORA_REEXEC"


# Backend ----------------------------------------------------------------


@contextlib.contextmanager
def _quiet_stderr():
    # TensorFlow and XLA print C++ log lines to file descriptor 2 when
    # they are imported, whatever TF_CPP_MIN_LOG_LEVEL says; they would
    # bury the one-line error messages this command promises.
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def use_backend(backend, jax_cache=None):
    """Sets KERAS_BACKEND and imports Keras and KerasHub.

    `jax_cache` (else the `KERAS_BIDORA_JAX_CACHE` environment variable)
    names a directory for JAX's persistent compilation cache.
    """
    if backend:
        os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "keras" in sys.modules and backend:
        import keras

        if keras.config.backend() != backend:
            # Keras was imported (with another backend) before the command
            # line was read, e.g. by an `import keras_bidora` that pulls it
            # in; it cannot switch, so run again in a fresh process.
            if os.environ.get(_REEXEC_FLAG):
                raise UsageError(
                    f"could not switch Keras to the {backend} backend"
                )
            os.environ[_REEXEC_FLAG] = "1"
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(
                sys.executable,
                [sys.executable, "-m", "keras_bidora", *sys.argv[1:]],
            )
    with _quiet_stderr():
        import keras
        import keras_hub  # noqa: F401

    _use_jax_cache(keras, jax_cache)
    return keras


def _use_jax_cache(keras, directory):
    """Turns on JAX's persistent compilation cache in `directory`."""
    if directory is None:
        directory = os.environ.get(config.JAX_CACHE_ENV) or None
        if directory is None or keras.config.backend() != "jax":
            return
    elif keras.config.backend() != "jax":
        raise UsageError(
            "--jax-compilation-cache is for the jax backend. Received: "
            f"--jax-compilation-cache {directory} with the "
            f"{keras.config.backend()} backend"
        )
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UsageError(
            "the JAX compilation cache must be a directory. Received: "
            f"{directory!r}, a file"
        )
    import jax

    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))


# Training ---------------------------------------------------------------


def prepare(args, spec, train, dev, preset):
    """`recipes.prepare` at `--sequence-length`."""
    from keras_bidora import recipes

    try:
        return recipes.prepare(spec, preset, train, dev, args.sequence_length)
    except ValueError as error:
        raise UsageError(str(error))


def train_method(
    args, method, spec, preset, prepared, merge=True, log=print, callbacks=()
):
    """`recipes.finetune` of one method with the command line's settings.

    `prepared` is a `recipes.Prepared` (or any object with its `x_train`,
    `y_train`, `x_dev`, `y_dev`, `dev` and `encoder`).

    Returns:
        `(result, finetuned)`: the metrics.json content (the dev metrics
        under `"dev"`, the task's `"main_metric"`) and the
        `recipes.FinetuneResult`.
    """
    from keras_bidora import recipes

    def score(model_outputs):
        predictions = prepared.encoder.decode(model_outputs, prepared.dev.texts)
        return spec.score(prepared.dev.labels, predictions)

    output_bias = preprocessing.initial_output_bias(spec, prepared.y_train)
    try:
        finetuned = recipes.finetune(
            lambda: preprocessing.build_model(
                spec, preset, pooling=args.pooling, output_bias=output_bias
            )[0],
            (prepared.x_train, prepared.y_train),
            (prepared.x_dev, prepared.y_dev),
            method,
            merge=merge,
            score=score,
            callbacks=callbacks,
            log=log,
            **inputs.recipe_settings(args),
            **recipes.compile_arguments(spec),
        )
    except ValueError as error:
        raise UsageError(str(error).splitlines()[0])
    result = finetuned.to_dict()
    result = {
        "method": result.pop("method"),
        "dev": result.pop("dev"),
        "main_metric": spec.main_metric,
        **result,
    }
    return result, finetuned


def run_train(args):
    if args.task in config.GENERATION_TASKS:
        return generation.run_train(args)
    inputs.check_method(args.method)
    outputs.check_out(args.out, args.overwrite)
    inputs.check_retrain_epochs(args.retrain_epochs)
    train, dev = inputs.load_training_data(args)
    spec = train.spec
    preset = inputs.resolve_preset(args.preset)
    keras = use_backend(args.backend, args.jax_compilation_cache)
    run_start = time.perf_counter()
    prepared = prepare(args, spec, train, dev, preset)
    result, finetuned = train_method(args, args.method, spec, preset, prepared)
    with outputs.staged_output(args.out) as staging:
        files = _write_run(
            args, staging, spec, preset, prepared, finetuned, result
        )
        result.update(
            {
                "task": spec.name,
                "train_examples": len(train),
                "dev_examples": len(dev),
                "sequence_length": prepared.encoder.sequence_length,
                "preset": preset,
                "files": files,
                "arguments": outputs.json_arguments(args),
                "versions": outputs.versions(keras),
            }
        )
        result["wall_time_s"]["total"] = time.perf_counter() - run_start
        path = os.path.join(staging, outputs.METRICS_FILE)
        outputs.write_json(path, result)
    print(outputs.result_line(result))
    print(f"Wrote {os.path.abspath(args.out)}")
    return 0


def _write_run(args, staging, spec, preset, prepared, finetuned, result):
    """Writes the model, the adapter file, model.json and training.png
    into `staging`; returns the names of what was written."""
    finetuned.merged.save(os.path.join(staging, outputs.MODEL_FILE))
    finetuned.save_adapter(os.path.join(staging, finetuned.adapter_file_name))
    info = outputs.model_info(
        args,
        spec,
        preset,
        prepared.encoder.sequence_length,
        args.method,
        prepared.x_train.keys(),
    )
    outputs.write_json(os.path.join(staging, inputs.MODEL_INFO_FILE), info)
    files = {
        "model": outputs.MODEL_FILE,
        "adapter": finetuned.adapter_file_name,
        "model_info": inputs.MODEL_INFO_FILE,
    }
    plot_path = os.path.join(staging, outputs.PLOT_FILE)
    if outputs.draw(outputs.plot_run, plot_path, result, spec):
        files["plot"] = outputs.PLOT_FILE
    return files


def info_spec(info):
    """The `TaskSpec` a model.json records."""
    return task_spec_lib.TaskSpec.from_config(info["task"])


# Demo -------------------------------------------------------------------


def run_demo(args):
    for method in args.methods:
        inputs.check_method(method)
    inputs.check_retrain_epochs(args.retrain_epochs)
    outputs.check_out(args.out, overwrite=True)
    train, dev = inputs.load_training_data(args)
    spec = train.spec
    preset = inputs.resolve_preset(args.preset)
    keras = use_backend(args.backend, args.jax_compilation_cache)
    print(
        f"Demo: {', '.join(args.methods)} on {spec.name} ({len(train)} train, "
        f"{len(dev)} dev examples), backend {keras.config.backend()}, "
        f"model {preset}"
    )
    start = time.perf_counter()
    prepared = prepare(args, spec, train, dev, preset)
    results = []
    for method in args.methods:
        method_start = time.perf_counter()
        result, _ = train_method(
            args, method, spec, preset, prepared, merge=False
        )
        result["wall_time_s"]["total"] = time.perf_counter() - method_start
        print(outputs.result_line(result))
        results.append(result)
    total = time.perf_counter() - start
    print()
    print(outputs.demo_table(results, spec))
    print(f"\nTotal wall time {total:.0f}s")
    summary = {
        "task": spec.name,
        "train_examples": len(train),
        "dev_examples": len(dev),
        "sequence_length": prepared.encoder.sequence_length,
        "preset": preset,
        "results": results,
        "wall_time_s": total,
        "arguments": outputs.json_arguments(args),
        "versions": outputs.versions(keras),
    }
    drawn = outputs.write_demo(args.out, summary, results, spec)
    also = f" and {outputs.DEMO_PLOT_FILE}" if drawn else ""
    print(f"Wrote {os.path.join(args.out, outputs.DEMO_FILE)}{also}")
    return 0


# Evaluate and predict ---------------------------------------------------


def _load_saved(model_path, backend, jax_cache=None):
    """`(model, spec, encoder)` of a model saved by `train`."""
    info = inputs.read_model_info(model_path)
    spec = info_spec(info)
    keras = use_backend(backend, jax_cache)
    try:
        with warnings.catch_warnings():
            # KerasHub tasks override `compile`, so Keras warns that it
            # does not restore their compile settings; predicting needs
            # none.
            warnings.filterwarnings("ignore", message=r"`compile\(\)` was not")
            model = keras.saving.load_model(model_path)
    except Exception as error:
        raise UsageError(
            f"{model_path}: cannot load the model "
            f"({str(error).strip().splitlines()[0]})"
        )
    try:
        encoder = preprocessing.Encoder(
            spec,
            info["preset"],
            info["sequence_length"],
            input_names=info.get("input_names"),
        )
    except ValueError as error:
        raise UsageError(str(error))
    return model, spec, encoder


def run_evaluate(args):
    saved = inputs.read_model_info(args.model)
    dev = inputs.load_evaluation_data(
        args, saved["task"], saved.get("columns", {})
    )
    dev = inputs.limit(dev, args.dev_limit)
    inputs.check_compatible(info_spec(saved), dev.spec)
    model, spec, encoder = _load_saved(
        args.model, args.backend, args.jax_compilation_cache
    )
    from keras_bidora import recipes

    x, _ = encoder.encode(dev.texts)
    model_outputs = recipes.predict(model, x, args.batch_size)
    scores = spec.score(dev.labels, encoder.decode(model_outputs, dev.texts))
    print(
        json.dumps(
            {"task": dev.spec.name, "examples": len(dev), "dev": scores},
            indent=2,
        )
    )
    return 0


def run_predict(args):
    model, spec, encoder = _load_saved(
        args.model, args.backend, args.jax_compilation_cache
    )
    from keras_bidora import recipes

    texts = list(args.texts)
    model_inputs = _predict_inputs(spec, texts, args.separator)
    x, _ = encoder.encode(model_inputs)
    model_outputs = np.asarray(recipes.predict(model, x, args.batch_size))
    predictions = encoder.decode(model_outputs, model_inputs)
    records = [
        _record(spec, text, model_inputs, model_outputs, predictions, index)
        for index, text in enumerate(texts)
    ]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    for record in records:
        print(_record_line(spec, record))
    return 0


def _predict_inputs(spec, texts, separator):
    """The encoder's input for `texts`: words, a pair of lists, or texts."""
    if spec.kind == "token_classification":
        words = [text.split() for text in texts]
        if any(not w for w in words):
            raise UsageError("a TEXT is empty")
        return words
    if not spec.pair:
        return texts
    pairs = []
    for text in texts:
        if separator not in text:
            raise UsageError(
                f"the model reads text pairs: write each TEXT as 'first "
                f"{separator} second' (missing in {text!r})"
            )
        first, second = text.split(separator, 1)
        pairs.append((first.strip(), second.strip()))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _record(spec, text, model_inputs, model_outputs, predictions, index):
    if spec.kind == "regression":
        return {"text": text, "score": float(predictions[index])}
    if spec.kind == "classification":
        logits = model_outputs[index].astype("float64")
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        label = int(predictions[index])
        return {
            "text": text,
            "label": spec.label_names[label],
            "probability": float(probabilities[label]),
        }
    tags = [spec.label_names[i] for i in predictions[index]]
    return {"text": text, "words": model_inputs[index], "tags": tags}


def _record_line(spec, record):
    if spec.kind == "regression":
        return f"{record['score']:.4f}\t{record['text']}"
    if spec.kind == "classification":
        return (
            f"{record['label']}\t{record['probability']:.3f}\t{record['text']}"
        )
    return " ".join(f"{w}/{t}" for w, t in zip(record["words"], record["tags"]))


COMMANDS = {
    "train": run_train,
    "demo": run_demo,
    "evaluate": run_evaluate,
    "predict": run_predict,
    "generate": generation.run_generate,
}
