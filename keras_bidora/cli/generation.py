"""`train --task e2e` and `generate`: a KerasHub `CausalLM` preset
fine-tuned on prompt/response text and scored by what it writes.

The recipe is `keras_bidora.recipes.finetune` (raw prompt/response text
goes through the task's own preprocessor, the prompts masked out of the
loss); the dev split is scored by corpus BLEU and ROUGE-L
(`keras_bidora.metrics`, from sacrebleu and rouge-score) of the merged
model's greedy completions against every reference of each prompt.
"""

import json
import os
import time
import warnings

from keras_bidora import config
from keras_bidora.cli import inputs
from keras_bidora.cli import outputs
from keras_bidora.cli.parser import UsageError
from keras_bidora.data import loaders

GENERATIONS_FILE = "generations.jsonl"


def run_train(args):
    """`keras-bidora train --task e2e --preset DIR`."""
    _check_train_arguments(args)
    outputs.check_out(args.out, args.overwrite)
    inputs.check_retrain_epochs(args.retrain_epochs)
    train, dev = _load(args)
    metrics = _scoring_metrics()
    keras = _use_backend(args.backend, args.jax_compilation_cache)
    run_start = time.perf_counter()
    build = _builder(keras, args)
    build()  # a preset that is no CausalLM fails here, before training
    from keras_bidora import recipes

    try:
        finetuned = recipes.finetune(
            build,
            (train, None),
            (dev, None),
            args.method,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            **inputs.recipe_settings(args),
        )
    except ValueError as error:
        raise UsageError(str(error).splitlines()[0])
    prompts, references = grouped_references(dev)
    completions = recipes.complete(
        finetuned.merged, prompts, batch_size=args.batch_size
    )
    scores = {
        "bleu": metrics.corpus_bleu(completions, references),
        "rouge_l": metrics.rouge_l(completions, references),
    }
    details = finetuned.to_dict()
    del details["method"], details["dev"]
    result = {
        "method": args.method,
        "dev": scores,
        "main_metric": "bleu",
        **details,
    }
    with outputs.staged_output(args.out) as staging:
        finetuned.merged.save(os.path.join(staging, outputs.MODEL_FILE))
        _write_generations(staging, prompts, completions, references)
        info = _model_info(args, finetuned.merged)
        outputs.write_json(os.path.join(staging, inputs.MODEL_INFO_FILE), info)
        result.update(
            {
                "task": args.task,
                "train_examples": len(train["prompts"]),
                "dev_examples": len(dev["prompts"]),
                "dev_prompts": len(prompts),
                "sequence_length": info["sequence_length"],
                "preset": args.preset,
                "files": {
                    "model": outputs.MODEL_FILE,
                    "model_info": inputs.MODEL_INFO_FILE,
                    "generations": GENERATIONS_FILE,
                },
                "arguments": outputs.json_arguments(args),
                "versions": outputs.versions(keras),
            }
        )
        result["wall_time_s"]["total"] = time.perf_counter() - run_start
        outputs.write_json(os.path.join(staging, outputs.METRICS_FILE), result)
    print(outputs.result_line(result))
    print(f"Wrote {os.path.abspath(args.out)}")
    return 0


def run_generate(args):
    """`keras-bidora generate --model DIR/model.keras PROMPT...`."""
    if not os.path.isfile(args.model):
        raise UsageError(f"{args.model}: no such file")
    keras = _use_backend(args.backend, args.jax_compilation_cache)
    try:
        with warnings.catch_warnings():
            # KerasHub tasks override `compile`; generating needs none.
            warnings.filterwarnings("ignore", message=r"`compile\(\)` was not")
            model = keras.saving.load_model(args.model)
    except Exception as error:
        raise UsageError(
            f"{args.model}: cannot load the model "
            f"({str(error).strip().splitlines()[0]})"
        )
    if not callable(getattr(model, "generate", None)):
        raise UsageError(
            f"{args.model} holds a {type(model).__name__}, which does not "
            "generate text; generate needs a CausalLM or Seq2SeqLM (e.g. "
            "from train --task e2e)"
        )
    from keras_bidora import recipes

    prompts = list(args.prompts)
    completions = recipes.complete(
        model, prompts, max_length=args.max_length, batch_size=args.batch_size
    )
    if args.json:
        records = [
            {"prompt": p, "completion": c} for p, c in zip(prompts, completions)
        ]
        print(json.dumps(records, indent=2))
        return 0
    for completion in completions:
        print(completion)
    return 0


def grouped_references(data):
    """`(prompts, references)`: each distinct prompt once, in first-seen
    order, with every response given for it (E2E has several references
    per meaning representation)."""
    references = {}
    for prompt, response in zip(data["prompts"], data["responses"]):
        references.setdefault(prompt, []).append(response)
    return list(references), list(references.values())


def _check_train_arguments(args):
    if args.method not in config.MODEL_METHODS:
        raise UsageError(
            f"--task {args.task} trains with --method "
            f"{' or '.join(config.MODEL_METHODS)} (BiDoRAModel applies the "
            f"task's preprocessor to the raw text); got --method {args.method}"
        )
    if args.preset is None:
        raise UsageError(
            f"--task {args.task} needs --preset: a KerasHub CausalLM preset "
            "name or folder (e.g. one written by task.save_to_preset)"
        )
    user_files = (args.train, args.dev, args.text_column, args.label_column)
    if any(value is not None for value in user_files):
        raise UsageError(
            f"--task {args.task} reads its own data; --train, --dev and the "
            "column flags are for classification or regression files"
        )


def _load(args):
    try:
        train = loaders.load_e2e(
            "train", limit=args.train_limit, data_dir=args.data_dir
        )
        dev = loaders.load_e2e(
            "dev", limit=args.dev_limit, data_dir=args.data_dir
        )
    except ValueError as error:
        raise UsageError(str(error))
    return train, dev


def _scoring_metrics():
    """`keras_bidora.metrics`, once sacrebleu and rouge-score import."""
    from keras_bidora import metrics

    try:
        metrics.check_generation_libraries()
    except ImportError as error:
        raise UsageError(str(error))
    return metrics


def _use_backend(backend, jax_cache):
    from keras_bidora.cli import commands

    return commands.use_backend(backend, jax_cache)


def _builder(keras, args):
    """A function building the preset's `CausalLM` at `--sequence-length`."""
    import keras_hub

    preset = inputs.resolve_preset(args.preset)

    def build():
        try:
            task = keras_hub.models.CausalLM.from_preset(preset)
        except Exception as error:
            raise UsageError(
                f"--preset {args.preset}: cannot load a KerasHub CausalLM "
                f"({str(error).strip().splitlines()[0]})"
            )
        if task.preprocessor is None:
            raise UsageError(
                f"--preset {args.preset} has no preprocessor; --task "
                f"{args.task} trains on raw text"
            )
        if args.sequence_length is not None:
            task.preprocessor.sequence_length = args.sequence_length
        return task

    return build


def _write_generations(folder, prompts, completions, references):
    path = os.path.join(folder, GENERATIONS_FILE)
    with open(path, "w", encoding="utf-8") as file:
        for prompt, completion, refs in zip(prompts, completions, references):
            record = {
                "prompt": prompt,
                "completion": completion,
                "references": refs,
            }
            file.write(json.dumps(record, ensure_ascii=False) + "\n")


def _model_info(args, merged):
    return {
        "format": "keras-bidora/1",
        "task": {"name": args.task, "kind": "generation"},
        "method": args.method,
        "preset": args.preset,
        "sequence_length": int(merged.preprocessor.sequence_length),
    }
