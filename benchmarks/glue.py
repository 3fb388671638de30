"""LoRA vs DoRA vs BiDoRA on small GLUE tasks, over seeds, equal budgets.

For each task (RTE, MRPC, CoLA, STS-B, and SST-2 at 1,000 training
examples), method (LoRA on the matrix view, DoRA, BiDoRA) and seed, one
run of the library's recipe (`keras_bidora.recipes.finetune`, its defaults
unless set here) on the default model. Every
method gets the same budget of epochs over the training data: LoRA and
DoRA train `--epochs` epochs; BiDoRA trains `--epochs - 1` bi-level epochs
(each on its 80% lower split, with upper steps on the other 20%) and one
retrain epoch on all the data. The dev metric is computed after every
epoch, with the training time so far (evaluation excluded), for the plot
of dev metric against wall-clock time.

`--study sensitivity` runs what the reviewers asked for on two tasks
(RTE and MRPC by default): BiDoRA with `upper_fraction` 0.1 and 0.3,
`direction_regularization` 0 and 1e-3, the `first_order` hypergradient and
`upper_every=4` (the main study's runs give 0.2, 1e-5, darts and 1), one
setting changed at a time, and every method on training subsets of 200 and
1,000 examples (`--train-sizes`; a seeded subset per seed; the main
study's runs give "all"). A subset trains the same epoch budget as the full
set, or with `--train-size-budget examples` as many more epochs as make
its examples seen, and so its steps, those of the full set's run.

To fit a study into CPU time, `--train-sample TASK=N` trains a task on a
seeded random sample of N of its training examples (one sample for every
method and seed; the files' order is by source or genre, so their first N
would not do) and `--sequence-length TASK=N` sets its sequence length.
Every run of the task records them, and the tables show such a variant as
a task of its own (e.g. `stsb, 1000 sampled, 64 tokens`).

Each finished run is appended to `OUT/runs.jsonl` at once, and runs
already there are not run again, so an interrupted study resumes where it
stopped. `--report` (also done at the end of every study) writes
`OUT/glue.md`, `OUT/glue.png` and `OUT/sensitivity.md` from the runs on
disk.

Tokenization (which needs TensorFlow Text) is done once per task and
cached in `--tokens` (default `OUT/tokens`); a study whose tokens are
cached needs neither the data files nor TensorFlow, e.g. on an
accelerator machine.

`--study pilot`, `--study floors` and `--study small-data` train until a
plateau instead (issue 27): early stopping on a seeded 10% of the training
data (never dev), the best epoch restored, within `--max-epochs`. The
pilot trains each method on `--pilot-size` examples at every learning
rate of `--learning-rates` and chooses, per task and method, the one with
the lowest loss on that held-out part; `floors` checks that LoRA learns
each task on its full training set at its pilot learning rate;
`small-data` compares LoRA, DoRA, BiDoRA (first_order) and BiDoRA (darts)
on seeded subsets of 100, 300 and 1,000 examples, each method at its
pilot learning rate. They write `OUT/pilot.md`, `OUT/floors.md`,
`OUT/small_data.md` and `OUT/small_data.png`.

Usage:

    # The study as committed (full GLUE training sets from ../shared/data):
    python benchmarks/glue.py --data-dir ../shared/data
    # CoLA and STS-B sized for 2 CPU cores, as committed:
    python benchmarks/glue.py --data-dir ../shared/data --study main \\
        --tasks cola stsb --train-sample cola=1000 stsb=1000 \\
        --sequence-length stsb=64
    # Only write the tables and the plot from the runs on disk:
    python benchmarks/glue.py --report
    # The small-data study: pilot, floors, then the study itself:
    python benchmarks/glue.py --data-dir ../shared/data --study pilot
    python benchmarks/glue.py --data-dir ../shared/data --study floors
    python benchmarks/glue.py --data-dir ../shared/data --study small-data
"""

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if __name__ == "__main__":
    # Keras reads KERAS_BACKEND once, when first imported (keras_bidora
    # imports it): set it from --backend before that.
    _early = argparse.ArgumentParser(add_help=False)
    _early.add_argument("--backend", default="jax")
    os.environ["KERAS_BACKEND"] = _early.parse_known_args()[0].backend

from keras_bidora import config  # noqa: E402
from keras_bidora.cli.parser import non_negative_int  # noqa: E402
from keras_bidora.cli.parser import positive_int  # noqa: E402
from keras_bidora.config import COMPARED_METHODS  # noqa: E402
from keras_bidora.data import loaders  # noqa: E402
from keras_bidora.data import preprocessing  # noqa: E402
from keras_bidora.data import task_spec as task_spec_lib  # noqa: E402

TASKS = ("rte", "mrpc", "cola", "stsb", "sst2")
SENSITIVITY_TASKS = ("rte", "mrpc")
METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "bidora": "BiDoRA"}
# SST-2 is not small: the study takes its first 1,000 training examples.
TRAIN_LIMITS = {"sst2": 1000}
# BiDoRA's settings varied one at a time, and the main study's values.
# The hypergradient and upper_every rows say what the cheaper settings
# cost in accuracy (their speed: speed.py).
VARIED = {
    "upper_fraction": (0.1, 0.3),
    "direction_regularization": (0.0, 1e-3),
    "hypergradient": ("first_order",),
    "upper_every": (4,),
}
# Pinned, not left to the library's defaults, so that runs made before and
# after a change of default stay comparable (the study ran darts, the
# paper's estimator; the library's default is now first_order).
STUDY_SETTINGS = {
    "upper_fraction": 0.2,
    "direction_regularization": 1e-5,
    "hypergradient": "darts",
    "upper_every": 1,
}
TRAIN_SIZES = (200, 1000)
# Changes that make a task's runs a variant of the study (a sample of its
# training set, another sequence length), not a sensitivity setting: every
# run of the task carries them, and the report shows the variant as a task
# of its own, named with these labels.
VARIANT_LABELS = {
    "train_sample": "{} sampled",
    "sequence_length": "{} tokens",
    "pooling": "{} pooling",
}
# The seed of `--train-sample`'s sample: one sample for every method and
# seed, so that a paired difference compares methods on the same data.
SAMPLE_SEED = 12345

# The studies that train until a plateau (issue 27), and their settings.
PLATEAU_STUDIES = ("pilot", "floors", "small-data")
# The pooling every study pins (another is a variant of the task), so that
# runs made before and after a change of the library's default stay
# comparable.
POOLING = "cls"
LEARNING_RATES = (5e-4, 1e-3, 2e-3, 5e-3)
PATIENCE = 3
# No phase stops before this many steps: on small data the held-out loss
# can sit at the targets' variance for several short epochs, and BiDoRA's
# bi-level phase stopped before it had learned (benchmarks/README.md,
# "Small data needs steps").
MIN_STEPS = 300
# Maxima: the first phase (LoRA and DoRA's only one, BiDoRA's bi-level
# one) and BiDoRA's retrain phase; each stops early before it.
MAX_EPOCHS = 20
MAX_RETRAIN_EPOCHS = 20
PILOT_SIZE = 1000
# The batch size of a plateau run on at most SMALL_BATCH_LIMIT examples
# (config.BATCH_SIZE above): at 32, STS-B's 270 training examples make 9
# steps an epoch, too few for early stopping to see learning begin
# (benchmarks/README.md, "Small data needs steps").
SMALL_BATCH_SIZE = 8
SMALL_BATCH_LIMIT = 1000
# No small-data run has this seed, so none trains on the pilot's subset
# with the pilot's initialisation.
PILOT_SEED = 100
SMALL_DATA_TASKS = ("rte", "mrpc", "sst2", "stsb")
SMALL_SIZES = (100, 300, 1000)
SMALL_DATA_SEEDS = (0, 1, 2, 3, 4)
SEEDS = (0, 1, 2)
# The methods of the plateau studies: name -> (recipe method, changes).
ARMS = {
    "lora": ("lora", {}),
    "dora": ("dora", {}),
    "bidora": ("bidora", {}),
    "bidora-darts": ("bidora", {"hypergradient": "darts"}),
}
ARM_NAMES = {**METHOD_NAMES, "bidora-darts": "BiDoRA (darts)"}
# BiDoRA's settings in the plateau studies: the library's defaults of
# issue 27 (first_order), pinned as STUDY_SETTINGS are.
PLATEAU_SETTINGS = {**STUDY_SETTINGS, "hypergradient": "first_order"}
# The small-data table's paired differences: (minuend, subtrahend).
DIFFERENCES = (("bidora", "dora"), ("bidora", "lora"), ("bidora-darts", "dora"))
# What LoRA must reach on a task's full training set for the task to stay
# in the small-data study: (metric, floor).
FLOORS = {
    "rte": ("accuracy", 0.60),
    "mrpc": ("accuracy", 0.80),
    "cola": ("matthews_correlation", 0.25),
    "stsb": ("pearson", 0.80),
    "sst2": ("accuracy", 0.85),
}
# The 97.5% quantile of Student's t by degrees of freedom, for the 95%
# intervals when SciPy (the `metrics` extra) is missing.
T_QUANTILES = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
}
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "glue")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="results folder")
    parser.add_argument(
        "--study",
        choices=("main", "sensitivity", "all", *PLATEAU_STUDIES),
        default="all",
        help="which runs (all: main, then sensitivity); pilot, floors and "
        "small-data train until a plateau (issue 27)",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=TASKS,
        help="(small-data: rte mrpc sst2 stsb; the others: all five)",
    )
    parser.add_argument(
        "--sensitivity-tasks",
        nargs="+",
        choices=TASKS,
        default=SENSITIVITY_TASKS,
    )
    parser.add_argument(
        "--vary",
        nargs="+",
        choices=(*VARIED, "train_size"),
        default=(*VARIED, "train_size"),
        help="the settings the sensitivity study varies, in this order "
        "(default: all)",
    )
    parser.add_argument(
        "--train-sizes",
        nargs="+",
        type=positive_int,
        default=TRAIN_SIZES,
        metavar="N",
        help="the training-set sizes of `--vary train_size` (200 1000; the "
        "main study's runs give all)",
    )
    parser.add_argument(
        "--train-size-budget",
        choices=("epochs", "examples"),
        default="epochs",
        help="epochs: a training subset trains the --epochs budget, as the "
        "full set does; examples: it trains as many more epochs as make "
        "the examples seen (and steps) those of the full set's run",
    )
    parser.add_argument(
        "--train-sample",
        nargs="+",
        default=[],
        metavar="TASK=N",
        help="train TASK on a seeded random sample of N of its training "
        "examples (one sample for every method and seed), e.g. cola=1000, "
        "so that a study fits CPU time; the runs are recorded as such",
    )
    parser.add_argument(
        "--sequence-length",
        nargs="+",
        default=[],
        metavar="TASK=N",
        help="TASK's sequence length instead of `keras-bidora train`'s "
        "default (sst2, cola: 64; the others: 128), e.g. stsb=64",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=COMPARED_METHODS,
        default=COMPARED_METHODS,
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=tuple(ARMS),
        default=tuple(ARMS),
        help="pilot, small-data: the methods trained (all of them)",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        help="(small-data: 0 1 2 3 4; pilot: 100; the others: 0 1 2)",
    )
    parser.add_argument(
        "--pooling",
        choices=config.POOLINGS,
        default=POOLING,
        help="how the head reads the backbone; another than cls makes the "
        "runs a variant of the task (cls)",
    )
    parser.add_argument(
        "--learning-rates",
        nargs="+",
        type=float,
        default=LEARNING_RATES,
        metavar="LR",
        help="the pilot's grid (5e-4 1e-3 2e-3 5e-3)",
    )
    parser.add_argument(
        "--learning-rate-of",
        nargs="+",
        default=[],
        metavar="METHOD=LR",
        help="floors and small-data: METHOD's learning rate instead of its "
        f"pilot's (METHOD one of {', '.join(ARMS)})",
    )
    parser.add_argument(
        "--pilot-size",
        type=positive_int,
        default=PILOT_SIZE,
        metavar="N",
        help=f"the pilot's training subset ({PILOT_SIZE})",
    )
    parser.add_argument(
        "--small-sizes",
        nargs="+",
        type=positive_int,
        default=SMALL_SIZES,
        metavar="N",
        help="small-data's training-set sizes (100 300 1000)",
    )
    parser.add_argument(
        "--patience",
        type=positive_int,
        default=PATIENCE,
        help="pilot, floors, small-data: epochs without a lower loss on "
        f"the held-out part of the training data before stopping "
        f"({PATIENCE})",
    )
    parser.add_argument(
        "--min-steps",
        type=non_negative_int,
        default=MIN_STEPS,
        help="pilot, floors, small-data: training steps of each phase "
        f"before it may stop early ({MIN_STEPS})",
    )
    parser.add_argument(
        "--max-epochs",
        type=positive_int,
        default=MAX_EPOCHS,
        help="pilot, floors, small-data: most epochs of the first phase "
        f"(LoRA, DoRA; BiDoRA's bi-level phase) ({MAX_EPOCHS})",
    )
    parser.add_argument(
        "--max-retrain-epochs",
        type=positive_int,
        default=MAX_RETRAIN_EPOCHS,
        help=f"most epochs of BiDoRA's retrain phase ({MAX_RETRAIN_EPOCHS})",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=3,
        help="epoch budget of every method; BiDoRA: EPOCHS-1 bi-level "
        "epochs and 1 retrain epoch (3)",
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a `keras_bidora.recipes.finetune` argument for every run, "
        "e.g. --setting learning_rate=2e-3 (repeatable; a number or a "
        "string)",
    )
    parser.add_argument(
        "--data-dir",
        help="folder with the full data (glue/<TASK>/{train,dev}.tsv); "
        "default: the small subsets shipped with keras_bidora",
    )
    parser.add_argument(
        "--tokens",
        help="tokenized-data cache (default OUT/tokens); cached tasks need "
        "neither the data files nor TensorFlow",
    )
    parser.add_argument("--preset", help="model (default: offline MiniLM)")
    parser.add_argument(
        "--backend", choices=config.BACKENDS, default="jax", help="(jax)"
    )
    parser.add_argument(
        "--jax-compilation-cache",
        metavar="DIR",
        help="JAX's persistent compilation cache: runs of the same shapes "
        "(other seeds) then skip compilation",
    )
    parser.add_argument(
        "--limit",
        type=positive_int,
        metavar="N",
        help="use only the first N train and dev examples of each task (a "
        "quick check of the script, not a result)",
    )
    parser.add_argument(
        "--stop-after",
        type=float,
        metavar="SECONDS",
        help="start no new run after this many seconds",
    )
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="only tokenize the tasks into the cache, then stop",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="only write the tables and plot from OUT/runs.jsonl",
    )
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error(f"--epochs must be >= 2. Received: {args.epochs}")
    for flag in ("train_sizes", "small_sizes", "learning_rates"):
        values = getattr(args, flag)
        if any(value <= 0 for value in values):
            parser.error(
                f"--{flag.replace('_', '-')} must be positive. Received: "
                f"{' '.join(map(str, values))}"
            )
    for flag in ("pilot_size", "patience", "max_epochs", "max_retrain_epochs"):
        if getattr(args, flag) < 1:
            parser.error(
                f"--{flag.replace('_', '-')} must be >= 1. Received: "
                f"{getattr(args, flag)}"
            )
    args.tasks = args.tasks or (
        SMALL_DATA_TASKS if args.study == "small-data" else TASKS
    )
    args.seeds = args.seeds or _default_seeds(args.study)
    args.learning_rate_of = _learning_rates_of(parser, args.learning_rate_of)
    if args.limit and os.path.abspath(args.out) == DEFAULT_OUT:
        parser.error(
            "--limit runs are checks, not results: give them another --out"
        )
    args.train_sample = _task_numbers(
        parser, "--train-sample", args.train_sample
    )
    args.sequence_length = _task_numbers(
        parser, "--sequence-length", args.sequence_length
    )
    args.tokens = args.tokens or os.path.join(args.out, "tokens")
    args.setting = _settings(parser, args.setting)
    return args


def _settings(parser, values):
    """`{name: value}` from `--setting NAME=VALUE ...` (numbers parsed)."""
    settings = {}
    for value in values:
        name, equals, text = value.partition("=")
        if not equals or not name.isidentifier():
            parser.error(f"--setting takes NAME=VALUE. Received: {value!r}")
        try:
            settings[name] = json.loads(text)
        except json.JSONDecodeError:
            settings[name] = text
    return settings


def _default_seeds(study):
    if study == "small-data":
        return SMALL_DATA_SEEDS
    return (PILOT_SEED,) if study == "pilot" else SEEDS


def _learning_rates_of(parser, values):
    """`{method: learning rate}` from `--learning-rate-of METHOD=LR ...`."""
    rates = {}
    for value in values:
        arm, _, text = value.partition("=")
        try:
            rate = float(text)
        except ValueError:
            rate = 0.0
        if arm not in ARMS or not rate > 0:
            parser.error(
                f"--learning-rate-of takes METHOD=LR with METHOD one of "
                f"{', '.join(ARMS)} and LR a positive number. Received: "
                f"{value!r}"
            )
        rates[arm] = rate
    return rates


def _task_numbers(parser, flag, values):
    """`{task: N}` from the values of the `TASK=N ...` option `flag`."""
    numbers = {}
    for value in values:
        task, _, number = value.partition("=")
        if task not in TASKS or not number.isdigit() or int(number) < 1:
            parser.error(
                f"{flag} takes TASK=N with TASK one of {', '.join(TASKS)} "
                f"and N a positive integer. Received: {value!r}"
            )
        numbers[task] = int(number)
    return numbers


def variant(args, task):
    """The changes every run of `task` carries (see `VARIANT_LABELS`)."""
    changes = {}
    if task in args.train_sample:
        changes["train_sample"] = args.train_sample[task]
    length = sequence_length(args, task)
    if length != config.sequence_length(task):
        changes["sequence_length"] = length
    if args.pooling != POOLING:
        changes["pooling"] = args.pooling
    return changes


# Runs -------------------------------------------------------------------


def planned_runs(args, records=None):
    """The runs of the chosen study, seed-major (a stopped study has all
    methods of its first seeds).

    Args:
        args: the parsed command line.
        records: the finished runs, whose pilot runs give the plateau
            studies' learning rates (default: those in `OUT/runs.jsonl`).

    Returns:
        A list of runs: dicts of `task`, `method`, `seed`, `changes` (and
        `study` for the plateau studies).
    """
    if args.study in PLATEAU_STUDIES:
        return plateau_runs(args, records)
    budget = (
        {"budget": "examples"} if args.train_size_budget == "examples" else {}
    )
    runs = []
    if args.study in ("main", "all"):
        for seed in args.seeds:
            for task in args.tasks:
                for method in args.methods:
                    runs.append(_run(task, method, seed, **variant(args, task)))
    if args.study in ("sensitivity", "all"):
        for seed in args.seeds:
            for task in args.sensitivity_tasks:
                base = variant(args, task)
                for name in args.vary:
                    if name == "train_size":
                        runs += [
                            _run(
                                task,
                                method,
                                seed,
                                **base,
                                train_size=size,
                                **budget,
                            )
                            for size in args.train_sizes
                            for method in args.methods
                        ]
                    elif "bidora" in args.methods:
                        runs += [
                            _run(task, "bidora", seed, **base, **{name: value})
                            for value in VARIED[name]
                        ]
    return runs


def _run(task, method, seed, **changes):
    return {"task": task, "method": method, "seed": seed, "changes": changes}


def plateau_runs(args, records=None):
    """The runs of `--study pilot`, `floors` or `small-data`, seed-major.

    The pilot trains every method (`ARMS`) at every learning rate of the
    grid on a `--pilot-size` subset; floors trains LoRA on the full
    training set and small-data every method on each `--small-sizes`
    subset, each method at its learning rate (`learning_rate_of`). A
    run's learning rate and subset size are among its changes, so that a
    run at another one is another run.
    """
    if args.study == "pilot":
        return [
            _plateau_run(
                "pilot",
                task,
                arm,
                seed,
                **variant(args, task),
                train_size=args.pilot_size,
                learning_rate=rate,
            )
            for seed in args.seeds
            for task in args.tasks
            for arm in args.arms
            for rate in args.learning_rates
        ]
    if records is None:
        records = read_runs(os.path.join(args.out, "runs.jsonl")).values()
    chosen = chosen_learning_rates(records)
    floors = args.study == "floors"
    sizes = [{}] if floors else [{"train_size": n} for n in args.small_sizes]
    runs = []
    for seed in args.seeds:
        for task in args.tasks:
            base = variant(args, task)
            for size in sizes:
                for arm in ("lora",) if floors else args.arms:
                    rate = learning_rate_of(args, chosen, task, arm)
                    runs.append(
                        _plateau_run(
                            args.study,
                            task,
                            arm,
                            seed,
                            **base,
                            **size,
                            learning_rate=rate,
                        )
                    )
    return runs


def _plateau_run(study, task, arm, seed, **changes):
    method, arm_changes = ARMS[arm]
    return dict(_run(task, method, seed, **arm_changes, **changes), study=study)


def arm_of(record):
    """The name in `ARMS` of a plateau run's method and changes."""
    changes = record["changes"]
    for arm, (method, arm_changes) in reversed(ARMS.items()):
        if record["method"] == method and all(
            changes.get(key) == value for key, value in arm_changes.items()
        ):
            return arm
    raise ValueError(f"A run of no method in ARMS. Received: {record!r}")


def _pilot_key(task, arm, changes):
    """What a pilot's choice is for: the task, method and the variant
    changes that alter the model or its inputs (not `train_sample`: the
    pilot trains on a subset anyway)."""
    variant_changes = tuple(
        (key, changes[key])
        for key in VARIANT_LABELS
        if key != "train_sample" and key in changes
    )
    return task, arm, variant_changes


def final_stopping_loss(record):
    """The best held-out loss of the phase that made the run's model (its
    last: BiDoRA's retrain phase); NaN or missing counts as infinite."""
    losses = record.get("stopping_loss") or {}
    for phase in ("retrain", "train", "bilevel"):
        if phase in losses:
            loss = losses[phase]
            return loss if math.isfinite(loss) else math.inf
    return math.inf


def chosen_learning_rates(records):
    """`{_pilot_key: learning rate}`: per task and method, the pilot's
    learning rate of the lowest held-out loss (mean over its seeds), never
    chosen on the dev metric."""
    losses = {}
    for record in records:
        if record.get("study") != "pilot":
            continue
        key = _pilot_key(record["task"], arm_of(record), record["changes"])
        rates = losses.setdefault(key, {})
        rate = record["changes"]["learning_rate"]
        rates.setdefault(rate, []).append(final_stopping_loss(record))
    return {
        key: min(rates, key=lambda rate: statistics.fmean(rates[rate]))
        for key, rates in losses.items()
    }


def learning_rate_of(args, chosen, task, arm):
    """`arm`'s learning rate on `task`: `--learning-rate-of`'s, else the
    pilot's choice (a `ValueError` saying how to run the pilot if none)."""
    if arm in args.learning_rate_of:
        return args.learning_rate_of[arm]
    key = _pilot_key(task, arm, variant(args, task))
    if key not in chosen:
        options = [f"--tasks {task}", f"--out {args.out}"]
        if args.pooling != POOLING:
            options.append(f"--pooling {args.pooling}")
        if task in args.sequence_length:
            options.append(
                f"--sequence-length {task}={args.sequence_length[task]}"
            )
        raise ValueError(
            f"No pilot runs of {arm} on {task} in {args.out}/runs.jsonl. "
            "Run `python benchmarks/glue.py --study pilot "
            f"{' '.join(options)}` first, or give --learning-rate-of "
            f"{arm}=LR."
        )
    return chosen[key]


def run_key(run):
    key = [run["task"], run["method"], run["seed"], run["changes"]]
    if "study" in run:
        key.append(run["study"])  # the main and sensitivity runs have none
    return json.dumps(key, sort_keys=True)


def read_runs(path):
    """Finished runs in `path`; a last line cut short by a kill is
    ignored."""
    runs = {}
    if not os.path.exists(path):
        return runs
    with open(path) as file:
        for line in file:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            runs[run_key(record)] = record
    return runs


def append_run(path, record):
    line = json.dumps(record, sort_keys=True)
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as file:
            file.seek(-1, os.SEEK_END)
            if file.read(1) != b"\n":
                line = "\n" + line  # after a line cut short by a kill
    with open(path, "a") as file:
        file.write(line + "\n")
        file.flush()
        os.fsync(file.fileno())


# Data -------------------------------------------------------------------


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class CachedEncoder:
    """What the dev scoring needs of an `Encoder`, without a tokenizer."""

    decode = preprocessing.Encoder.decode

    def __init__(self, spec, sequence_length):
        self.spec = spec
        self.sequence_length = sequence_length


class CachedDev:
    def __init__(self, labels):
        self.labels = labels
        self.texts = None  # only token classification decodes with texts


class Prepared:
    """A task's tokenized train and dev data (as `recipes.prepare`'s)."""

    def __init__(self, spec, arrays, meta, indices=None):
        x_train, y_train = _split(arrays, "train")
        if indices is not None:
            x_train = {key: value[indices] for key, value in x_train.items()}
            y_train = y_train[indices]
        self.x_train, self.y_train = x_train, y_train
        self.x_dev, self.y_dev = _split(arrays, "dev")
        self.dev = CachedDev(self.y_dev.tolist())
        self.encoder = CachedEncoder(spec, meta["sequence_length"])

    def __len__(self):
        return len(self.y_train)


def _split(arrays, split):
    """`(x, y)` of one split of `tokens`' arrays (keys `<split>_<name>`)."""
    prefix = f"{split}_"
    x = {
        key[len(prefix) :]: value
        for key, value in arrays.items()
        if key.startswith(prefix) and key != f"{split}_labels"
    }
    return x, arrays[f"{split}_labels"]


def sequence_length(args, task):
    """`task`'s sequence length in this study (`--sequence-length`)."""
    return args.sequence_length.get(task, config.sequence_length(task))


def tokens(args, task, preset, log=print):
    """The task's tokenized data: `(arrays, meta)`, cached in `--tokens`
    (`TASK.npz`, or `TASK-LENGTH.npz` at another sequence length than the
    default; `-all` added where the plateau studies read more of the
    training set than `TRAIN_LIMITS`)."""
    length = sequence_length(args, task)
    name = (
        task if length == config.sequence_length(task) else f"{task}-{length}"
    )
    limit = train_limit(args, task)
    if limit is None and task in TRAIN_LIMITS:
        name += "-all"
    path = os.path.join(args.tokens, f"{name}.npz")
    meta_path = os.path.join(args.tokens, f"{name}.json")
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as file:
            meta = json.load(file)
        expected = _data_files(args, task)
        if meta["sequence_length"] != length:
            raise ValueError(
                f"The cached tokens {path} have sequence length "
                f"{meta['sequence_length']}, not {length}; remove the cache "
                "or use another --tokens folder."
            )
        if expected is not None and meta["files"] != expected:
            raise ValueError(
                f"The cached tokens {path} were made from other data files "
                f"({meta['files']}) than --data-dir gives ({expected}); "
                "remove the cache or use another --tokens folder."
            )
        with np.load(path) as arrays:
            return dict(arrays), meta
    files = _data_files(args, task)
    if files is None:
        raise ValueError(
            f"No cached tokens for {task} in {args.tokens}, and no data "
            f"files to make them from (--data-dir {args.data_dir})."
        )
    train = loaders.load_task(task, "train", limit, args.data_dir)
    dev = loaders.load_task(task, "dev", None, args.data_dir)
    start = time.perf_counter()
    encoder = preprocessing.Encoder(train.spec, preset, length)
    x_train, y_train = encoder.encode(train.texts, train.labels)
    x_dev, y_dev = encoder.encode(dev.texts, dev.labels)
    arrays = {f"train_{key}": value for key, value in x_train.items()}
    arrays.update({f"dev_{key}": value for key, value in x_dev.items()})
    arrays["train_labels"] = y_train
    arrays["dev_labels"] = y_dev
    meta = {
        "task": task,
        "sequence_length": length,
        "train_examples": len(train),
        "train_limit": limit,
        "dev_examples": len(dev),
        "files": files,
        "tokenizer": os.path.basename(os.path.normpath(str(preset))),
    }
    os.makedirs(args.tokens, exist_ok=True)
    _write_atomic(path, lambda f: np.savez_compressed(f, **arrays), "wb")
    _write_atomic(meta_path, lambda f: json.dump(meta, f, indent=1), "w")
    log(
        f"Tokenized {task}: {len(train)} train, {len(dev)} dev examples, "
        f"{length} tokens, in {time.perf_counter() - start:.0f}s"
    )
    return arrays, meta


def train_limit(args, task):
    """The training examples read of `task`: the plateau studies read them
    all (SST-2's too), the others `TRAIN_LIMITS`'."""
    return None if args.study in PLATEAU_STUDIES else TRAIN_LIMITS.get(task)


def _data_files(args, task):
    """`{file name: sha256}` of the task's data files, None if absent."""
    base = args.data_dir or loaders.FILES_DIR
    paths = [loaders.glue_path(task, s, base) for s in loaders.SPLITS]
    if not all(os.path.exists(p) for p in paths):
        return None
    return {os.path.relpath(p, base): _sha256(p) for p in paths}


def _write_atomic(path, write, mode):
    partial = f"{path}.partial"
    with open(partial, mode) as file:
        write(file)
    os.replace(partial, path)


# Training ---------------------------------------------------------------


def run_settings(args, run, epochs, retrain_epochs, train_examples):
    """The `recipes.finetune` arguments of `run` (beyond data and method)
    on `train_examples` examples: the plateau studies' runs also stop
    early (after `--min-steps` steps at least), at their learning rate, in
    `plateau_batch_size` batches."""
    settings = {
        "seed": run["seed"],
        "epochs": epochs,
        "retrain_epochs": retrain_epochs,
        "validation": False,
        "verbose": 0,
    }
    pinned = PLATEAU_SETTINGS if "study" in run else STUDY_SETTINGS
    for name, default in pinned.items():
        settings[name] = run["changes"].get(name, default)
    if "study" in run:
        settings["learning_rate"] = run["changes"]["learning_rate"]
        settings["early_stopping_patience"] = args.patience
        settings["early_stopping_min_steps"] = args.min_steps
        settings["batch_size"] = plateau_batch_size(train_examples)
    settings.update(args.setting)
    return settings


def plateau_batch_size(train_examples):
    """A plateau run's batch size: `SMALL_BATCH_SIZE` on at most
    `SMALL_BATCH_LIMIT` training examples, `config.BATCH_SIZE` above."""
    if train_examples <= SMALL_BATCH_LIMIT:
        return SMALL_BATCH_SIZE
    return config.BATCH_SIZE


def _dev_curve_callback(keras, prepared, spec, batch_size, points, dev=True):
    """After each epoch: the training time so far and, if `dev`, the dev
    metric (the plateau studies predict dev only at the end)."""
    from keras_bidora import recipes

    class DevCurve(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.start
            previous = points[-1]["train_s"] if points else 0.0
            points.append({"train_s": previous + seconds})
            if dev:
                outputs = recipes.predict(
                    self.model, prepared.x_dev, batch_size
                )
                points[-1]["dev"] = _score(spec, prepared, outputs)

    return DevCurve()


def _score(spec, prepared, outputs):
    predictions = prepared.encoder.decode(outputs, None)
    return spec.score(prepared.dev.labels, predictions)


def epoch_budget(args, run, train_examples, full_examples):
    """`(epochs, retrain_epochs)` of a run on `train_examples` examples.

    Every method gets `--epochs`, BiDoRA's bi-level and retrain epochs
    counted against it; a subset with the "examples" budget gets as many
    more epochs as make its examples seen those of the full set's run. A
    plateau study's run gets `plateau_epochs`, maxima for its early
    stopping.
    """
    if "study" in run:
        return plateau_epochs(args, run, train_examples)
    budget = args.epochs
    if run["changes"].get("budget") == "examples":
        budget = round(args.epochs * full_examples / train_examples)
    if run["method"] == "bidora":
        return budget - 1, 1
    return budget, 0


def plateau_epochs(args, run, train_examples):
    """`(epochs, retrain_epochs)` maxima of a plateau run.

    `--max-epochs` (and BiDoRA's `--max-retrain-epochs`), raised where a
    phase's epochs are so short that they would end before `--min-steps`
    steps and `--patience` epochs after them: at 100 examples LoRA makes
    12 steps an epoch and BiDoRA's bi-level phase 9, so 20 epochs would
    stop them before the step budget.
    """
    from keras_bidora import recipes
    from keras_bidora.training import bilevel_dataset

    batch_size = plateau_batch_size(train_examples)
    fitted = train_examples - recipes.held_out_count(
        train_examples, config.EARLY_STOPPING_FRACTION
    )
    if run["method"] != "bidora":
        return _enough_epochs(args, args.max_epochs, fitted, batch_size), 0
    upper_fraction = run["changes"].get(
        "upper_fraction", PLATEAU_SETTINGS["upper_fraction"]
    )
    lower = fitted - bilevel_dataset.upper_sample_count(fitted, upper_fraction)
    return (
        _enough_epochs(args, args.max_epochs, lower, batch_size),
        _enough_epochs(args, args.max_retrain_epochs, fitted, batch_size),
    )


def _enough_epochs(args, maximum, examples, batch_size):
    """`maximum`, or the epochs of `examples` in `batch_size` batches that
    hold `--min-steps` steps and then `--patience` epochs, if more."""
    steps = math.ceil(examples / batch_size)
    return max(maximum, math.ceil(args.min_steps / steps) + args.patience)


def train_indices(run, total):
    """`(indices, full)`: the training examples of `run`, of the `total`
    cached (None: all), and how many the task's full runs train on.

    `train_sample` draws one sample for every method and seed; a
    `train_size` subset, drawn from that sample where there is one, is the
    same for every method at a seed and another at each seed.
    """
    changes = run["changes"]
    pool = np.arange(total)
    sample = changes.get("train_sample")
    if sample is not None:
        if sample >= total:
            raise ValueError(
                f"--train-sample {run['task']}={sample} is not smaller than "
                f"its {total} training examples; leave the task out of "
                "--train-sample to train on all of them."
            )
        rng = np.random.default_rng(SAMPLE_SEED)
        pool = np.sort(rng.permutation(total)[:sample])
    full = len(pool)
    size = changes.get("train_size")
    if size is not None and size < full:
        rng = np.random.default_rng(1000 + run["seed"])
        pool = pool[np.sort(rng.permutation(full)[:size])]
    return (None if len(pool) == total else pool), full


def train_one(keras, args, run, arrays, meta, preset):
    from keras_bidora import recipes

    spec = task_spec_lib.get_task_spec(run["task"])
    indices, full = train_indices(run, len(arrays["train_labels"]))
    prepared = Prepared(spec, arrays, meta, indices)
    epochs, retrain_epochs = epoch_budget(args, run, len(prepared), full)
    settings = run_settings(args, run, epochs, retrain_epochs, len(prepared))
    batch_size = settings.get("batch_size", config.BATCH_SIZE)
    pooling = run["changes"].get("pooling", POOLING)
    output_bias = None
    if "study" in run:
        output_bias = preprocessing.initial_output_bias(spec, prepared.y_train)
    points = []
    callback = _dev_curve_callback(
        keras, prepared, spec, batch_size, points, dev="study" not in run
    )
    start = time.perf_counter()
    result = recipes.finetune(
        lambda: preprocessing.build_model(
            spec, preset, pooling=pooling, output_bias=output_bias
        )[0],
        (prepared.x_train, prepared.y_train),
        (prepared.x_dev, prepared.y_dev),
        run["method"],
        merge=False,
        score=lambda outputs: _score(spec, prepared, outputs),
        log=lambda message: None,
        callbacks=[callback],
        **recipes.compile_arguments(spec),
        **settings,
    )
    record = dict(run)
    record.update(
        {
            "dev": result.dev_metrics,
            "main_metric": spec.main_metric,
            "curve": points,
            "train_s": points[-1]["train_s"],
            "wall_s": time.perf_counter() - start,
            "steps": result.steps,
            "train_examples": len(prepared),
            "dev_examples": len(prepared.y_dev),
            "sequence_length": meta["sequence_length"],
            "data_files": meta["files"],
            "parameters": result.parameters,
            "settings": settings,
            "backend": keras.config.backend(),
        }
    )
    if "study" in run:
        record.update(
            {
                "best_epochs": result.best_epochs,
                "stopping_loss": result.stopping_loss,
                "history": _plain(result.history),
                "learning_rate": settings["learning_rate"],
                "pooling": pooling,
            }
        )
    return record


def _plain(history):
    """`{phase: {log: [floats]}}`, JSON-ready."""
    return {
        phase: {
            name: [float(v) for v in values] for name, values in logs.items()
        }
        for phase, logs in history.items()
    }


def _device(keras):
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        return str(jax.devices()[0].device_kind)
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            return gpus[0].name
    return "cpu"


def run_study(args):
    os.makedirs(args.out, exist_ok=True)
    preset = preprocessing.resolve_preset(args.preset)
    runs_path = os.path.join(args.out, "runs.jsonl")
    tasks = sorted(
        set(args.tasks if args.study != "sensitivity" else ())
        | set(
            args.sensitivity_tasks
            if args.study in ("sensitivity", "all")
            else ()
        )
    )
    data = {task: tokens(args, task, preset) for task in tasks}
    if args.limit:
        data = {
            task: ({k: v[: args.limit] for k, v in arrays.items()}, meta)
            for task, (arrays, meta) in data.items()
        }
    if args.prepare:
        return 0
    done = read_runs(runs_path)
    planned = planned_runs(args, done.values())
    if args.jax_compilation_cache and args.backend == "jax":
        import jax

        jax.config.update(
            "jax_compilation_cache_dir", args.jax_compilation_cache
        )
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    import keras
    import keras_hub  # noqa: F401  (registers the KerasHub models)

    device = _device(keras)
    todo = [
        run
        for run in planned
        if run_key(run) not in done
        # A subset as large as the training set is the main study's run.
        and (
            "study" in run
            or run["changes"].get("train_size", 0)
            < train_indices(run, len(data[run["task"]][0]["train_labels"]))[1]
        )
    ]
    print(
        f"{len(done)} runs on disk, {len(todo)} to run, backend "
        f"{args.backend} on {device}",
        flush=True,
    )
    start = time.perf_counter()
    for number, run in enumerate(todo, 1):
        if args.stop_after and time.perf_counter() - start > args.stop_after:
            print(f"Stopped after {args.stop_after:.0f}s (--stop-after)")
            break
        arrays, meta = data[run["task"]]
        record = train_one(keras, args, run, arrays, meta, preset)
        record["device"] = device
        record["limit"] = args.limit
        record["command"] = " ".join(sys.argv)
        append_run(runs_path, record)
        value = record["dev"][record["main_metric"]]
        print(
            f"[{number}/{len(todo)}] {run['task']} {run['method']} seed "
            f"{run['seed']} {run['changes'] or ''}: {record['main_metric']} "
            f"{value:.4f}, train {record['train_s']:.1f}s",
            flush=True,
        )
    write_report(args)
    return 0


# Report -----------------------------------------------------------------


def _mean_sd(values):
    if not values:
        return None
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return mean, sd


def _fmt(pair, scale=100.0, digits=1):
    if pair is None:
        return "n/a"
    mean, sd = pair
    mean = mean * scale
    if round(mean, digits) == 0:
        mean = 0.0  # not "-0.0"
    if math.isnan(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd * scale:.{digits}f}"


def by_variant(records):
    """`(records, tasks)`: the records with a variant's changes (see
    `VARIANT_LABELS`) moved into the task's name, e.g. `cola, 1000 sampled`,
    so that the tables show a variant as a task of its own; and the task
    names in `TASKS` order, each task's variants after it."""
    relabeled = []
    for record in records:
        changes = record["changes"]
        keys = [key for key in VARIANT_LABELS if key in changes]
        if keys:
            parts = [record["task"]]
            parts += [VARIANT_LABELS[key].format(changes[key]) for key in keys]
            record = dict(
                record,
                task=", ".join(parts),
                changes={k: v for k, v in changes.items() if k not in keys},
            )
        relabeled.append(record)
    names = {r["task"] for r in relabeled}
    tasks = []
    for task in TASKS:
        tasks += [task] if task in names else []
        tasks += sorted(n for n in names if n.startswith(f"{task}, "))
    return relabeled, tasks


def _fastest(runs):
    # The fastest seed: on JAX with a compilation cache, the first run of
    # each shape also pays for compiling.
    if not runs:
        return "n/a"
    return f"{min(r['train_s'] for r in runs.values()):.0f}"


def _metric(record):
    return record["dev"][record["main_metric"]]


def _select(records, task, method, **changes):
    return {
        r["seed"]: r
        for r in records
        if r["task"] == task
        and r["method"] == method
        and r["changes"] == changes
    }


def _paired_difference(cells):
    """BiDoRA - DoRA per common seed: `((mean, sd), number of seeds)`."""
    paired = sorted(set(cells["dora"]) & set(cells["bidora"]))
    differences = [
        _metric(cells["bidora"][s]) - _metric(cells["dora"][s]) for s in paired
    ]
    return _mean_sd(differences), len(paired)


def _where(runs):
    """The devices of `runs`, and whether the weights were float16."""
    devices = sorted({r.get("device", "?") for r in runs})
    if any("minilm-fp16" in r.get("command", "") for r in runs):
        devices.append("float16-rounded weights")
    return ", ".join(devices)


def main_table(records, tasks):
    lines = [
        "| task (metric x100) | LoRA | DoRA | BiDoRA | BiDoRA - DoRA "
        "(paired seeds) | runs (LoRA / DoRA / BiDoRA) | fastest run's "
        "training time, s (LoRA / DoRA / BiDoRA) | where |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in tasks:
        cells = {m: _select(records, task, m) for m in COMPARED_METHODS}
        runs = [r for c in cells.values() for r in c.values()]
        if not runs:
            continue
        values = {
            m: _mean_sd([_metric(r) for r in cells[m].values()])
            for m in COMPARED_METHODS
        }
        difference, paired = _paired_difference(cells)
        counts = " / ".join(str(len(cells[m])) for m in COMPARED_METHODS)
        times = " / ".join(_fastest(cells[m]) for m in COMPARED_METHODS)
        lines.append(
            f"| {task} ({runs[0]['main_metric']}) | {_fmt(values['lora'])} "
            f"| {_fmt(values['dora'])} | {_fmt(values['bidora'])} | "
            f"{_fmt(difference)} ({paired}) | {counts} | {times} | "
            f"{_where(runs)} |"
        )
    return "\n".join(lines)


def _epochs(record):
    """A run's epoch budget (BiDoRA: bi-level and retrain epochs)."""
    if "settings" in record:
        settings = record["settings"]
        return settings["epochs"] + settings["retrain_epochs"]
    # Runs made before the recipe moved into the library kept their
    # `keras-bidora train` command line.
    argv = record["train_argv"]
    return int(argv[argv.index("--epochs") + 1]) + int(
        argv[argv.index("--retrain-epochs") + 1]
    )


def _size_label(label, changes, cells):
    """Says how many examples "all" is, and a scaled epoch budget."""
    runs = [r for cell in cells.values() for r in cell.values()]
    if not changes:
        sizes = sorted(
            {r["train_examples"] for r in runs if "train_examples" in r}
        )
        return f"{label} ({'/'.join(map(str, sizes))})" if sizes else label
    if changes.get("budget"):
        epochs = sorted({_epochs(r) for r in runs})
        return f"{label}, {'/'.join(map(str, epochs))} epochs"
    return label


def sensitivity_table(records, tasks):
    lines = [
        "| task | setting | LoRA | DoRA | BiDoRA | BiDoRA - DoRA (paired "
        "seeds) | BiDoRA's seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    # (name varied, label, the runs' changes); the main study's runs give
    # each setting's default and the full training set.
    settings = [
        (
            name,
            f"{name}={value}",
            {} if value == STUDY_SETTINGS[name] else {name: value},
        )
        for name, values in VARIED.items()
        for value in (STUDY_SETTINGS[name], *values)
    ]
    subsets = sorted(
        {
            (r["changes"]["train_size"], r["changes"].get("budget", ""))
            for r in records
            if "train_size" in r["changes"]
        }
    )
    for size, budget in subsets:
        changes = {"train_size": size}
        if budget:
            changes["budget"] = budget
        settings.append(("train_size", f"train_size={size}", changes))
    settings.append(("train_size", "train_size=all", {}))
    varied = {r["task"] for r in records if r["changes"]}
    for task in [t for t in tasks if t in varied]:
        for name, label, changes in settings:
            if not any(
                name in r["changes"] for r in records if r["task"] == task
            ):
                continue  # this setting was not varied on this task
            cells = {
                m: _select(records, task, m, **changes)
                for m in COMPARED_METHODS
            }
            if not cells["bidora"]:
                continue
            if name != "train_size":
                # BiDoRA's own settings: LoRA and DoRA at theirs.
                cells["lora"] = _select(records, task, "lora")
                cells["dora"] = _select(records, task, "dora")
            values = {
                m: _mean_sd([_metric(r) for r in cells[m].values()])
                for m in COMPARED_METHODS
            }
            difference, paired = _paired_difference(cells)
            metric = next(iter(cells["bidora"].values()))["main_metric"]
            if name == "train_size":
                label = _size_label(label, changes, cells)
            seeds = sorted(cells["bidora"])
            lines.append(
                f"| {task} ({metric}) | {label} | "
                f"{_fmt(values['lora'])} | {_fmt(values['dora'])} | "
                f"{_fmt(values['bidora'])} | {_fmt(difference)} ({paired}) | "
                f"{','.join(map(str, seeds))} |"
            )
    return "\n".join(lines)


def _panels(count, width):
    """A figure of `count` side-by-side panels, `width` inches each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, count, figsize=(width * count, 3.2), squeeze=False)


def _save(figure, axes, ylabel, path):
    """Labels the first panel, puts the legend on the last, writes `path`."""
    import matplotlib.pyplot as plt

    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot(records, tasks, path):
    tasks = [
        t
        for t in tasks
        if any(_select(records, t, m) for m in COMPARED_METHODS)
    ]
    if not tasks:
        return False
    figure, axes = _panels(len(tasks), 3.6)
    for axis, task in zip(axes[0], tasks):
        for method in COMPARED_METHODS:
            runs = list(_select(records, task, method).values())
            if not runs:
                continue
            metric = runs[0]["main_metric"]
            length = min(len(r["curve"]) for r in runs)
            # The fastest seed's clock (as the table's times): on JAX with a
            # compilation cache, the first seed also pays for compiling.
            fastest = min(runs, key=lambda r: r["train_s"])
            seconds = [fastest["curve"][i]["train_s"] for i in range(length)]
            values = [
                [100 * r["curve"][i]["dev"][metric] for r in runs]
                for i in range(length)
            ]
            means = [statistics.fmean(v) for v in values]
            low = [min(v) for v in values]
            high = [max(v) for v in values]
            axis.plot(seconds, means, marker="o", label=METHOD_NAMES[method])
            axis.fill_between(seconds, low, high, alpha=0.15)
        axis.set_title(f"{task} ({metric})")
        axis.set_xlabel("training time, fastest seed (s)")
        axis.grid(alpha=0.3)
    _save(figure, axes, "dev metric x100 (mean, range over seeds)", path)
    return True


def write_report(args):
    """Writes the tables and plots of every study with runs on disk."""
    records = list(read_runs(os.path.join(args.out, "runs.jsonl")).values())
    if not records:
        print(f"No runs in {args.out}/runs.jsonl yet")
        return
    main_records = [r for r in records if "study" not in r]
    if main_records:
        _write_main_report(args, main_records)
    if any(r.get("study") == "pilot" for r in records):
        _write(args, "pilot.md", pilot_report(records))
    if any(r.get("study") == "floors" for r in records):
        _write(args, "floors.md", floors_report(records))
    if any(r.get("study") == "small-data" for r in records):
        _write(args, "small_data.md", small_data_report(records))
        small_data_plot(records, os.path.join(args.out, "small_data.png"))


def _write(args, name, text):
    with open(os.path.join(args.out, name), "w") as file:
        file.write(text)
    print(text)


def _write_main_report(args, records):
    records, tasks = by_variant(records)
    devices = sorted({r.get("device", "?") for r in records})
    backends = sorted({r["backend"] for r in records})
    header = (
        f"{len(records)} runs, backend {', '.join(backends)} on "
        f"{', '.join(devices)}. Dev metric x100, mean ± standard deviation "
        "over seeds; BiDoRA - DoRA is the mean and standard deviation of "
        "the per-seed differences, with the number of seeds both ran; "
        "training time excludes the per-epoch dev evaluations and is the "
        "fastest seed's (on JAX with a compilation cache, a shape's first "
        "run also pays for compiling).\n\n"
    )
    with open(os.path.join(args.out, "glue.md"), "w") as file:
        file.write(header + main_table(records, tasks) + "\n")
    with open(os.path.join(args.out, "sensitivity.md"), "w") as file:
        file.write(
            header + "BiDoRA's settings change one at a time (the others "
            "as in the main study); LoRA and DoRA are the main study's runs "
            "except in the train_size rows, where every method trains on "
            "the same seeded subset.\n\n"
            + sensitivity_table(records, tasks)
            + "\n"
        )
    plot(records, tasks, os.path.join(args.out, "glue.png"))
    print(main_table(records, tasks))
    print()
    print(sensitivity_table(records, tasks))


# Report of the plateau studies -------------------------------------------


def t_quantile(degrees):
    """Student's t 97.5% quantile at `degrees` degrees of freedom.

    SciPy's (the `metrics` extra), else `T_QUANTILES`' (up to 10).

    Raises:
        ImportError: without SciPy, beyond `T_QUANTILES`.
    """
    try:
        from scipy import stats
    except ImportError:
        if degrees not in T_QUANTILES:
            raise ImportError(
                f"A 95% interval over {degrees + 1} seeds needs SciPy: pip "
                "install 'keras-bidora[metrics]'. Received: "
                f"degrees={degrees}"
            ) from None
        return T_QUANTILES[degrees]
    return float(stats.t.ppf(0.975, degrees))


def mean_interval(values):
    """`(mean, half width, n)`: the mean of `values` and the half width of
    its 95% Student t interval, `t(0.975, n - 1) * sd / sqrt(n)` (NaN for
    one value); None for none."""
    values = list(values)
    if not values:
        return None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, 1
    sd = statistics.stdev(values)
    half = t_quantile(len(values) - 1) * sd / math.sqrt(len(values))
    return mean, half, len(values)


def _fmt_interval(interval, scale=100.0, digits=1):
    """`mean [low, high] (n)`, x`scale`."""
    if interval is None:
        return "n/a"
    mean, half, count = interval
    text = _fmt((mean, math.nan), scale, digits)
    if not math.isnan(half):
        low = _fmt((mean - half, math.nan), scale, digits)
        high = _fmt((mean + half, math.nan), scale, digits)
        text += f" [{low}, {high}]"
    return f"{text} ({count})"


def plateau_cells(records, study):
    """`(cells, tasks)`: `{(task, train_size, method): {seed: record}}` of
    a plateau study's runs, with `by_variant`'s task names (in its order);
    methods are `ARMS`' names, and a later run of a seed wins (one at
    another learning rate)."""
    relabeled, tasks = by_variant(
        [r for r in records if r.get("study") == study]
    )
    cells = {}
    for record in relabeled:
        size = record["changes"].get("train_size")
        cell = cells.setdefault((record["task"], size, arm_of(record)), {})
        cell[record["seed"]] = record
    return cells, tasks


def paired_difference(first, second):
    """`mean_interval` of `first - second` over their common seeds (each a
    `{seed: record}`), None without one."""
    seeds = sorted(set(first) & set(second))
    return mean_interval(
        _metric(first[seed]) - _metric(second[seed]) for seed in seeds
    )


def _mean_time(cell):
    if not cell:
        return "n/a"
    return f"{statistics.fmean(r['train_s'] for r in cell.values()):.0f}"


def _rates(cell):
    rates = sorted({r["changes"]["learning_rate"] for r in cell.values()})
    return "/".join(f"{rate:g}" for rate in rates) or "n/a"


def _plateau_report(records, study, explanation, table):
    """A plateau study's report: where its runs ran, how they stopped,
    `explanation` and `table`."""
    runs = [r for r in records if r.get("study") == study]
    backends = sorted({r["backend"] for r in runs})
    return (
        f"{len(runs)} runs, backend {', '.join(backends)} on "
        f"{_where(runs)}. Every run stops early on a seeded "
        f"{config.EARLY_STOPPING_FRACTION:.0%} of its training data (never "
        f"dev), its best epoch restored; dev metric x100. {explanation}"
        f"\n\n{table}\n"
    )


def small_data_table(records):
    """One row per task and training-set size: each method's mean ± sd,
    the paired differences of `DIFFERENCES` with their 95% t intervals,
    mean training times and learning rates."""
    cells, tasks = plateau_cells(records, "small-data")
    names = [ARM_NAMES[arm] for arm in ARMS]
    lines = [
        "| task (metric x100) | examples | "
        + " | ".join(names)
        + " | "
        + " | ".join(
            f"{ARM_NAMES[a]} - {ARM_NAMES[b]} [95%] (seeds)"
            for a, b in DIFFERENCES
        )
        + f" | mean training time, s ({' / '.join(names)}) | learning "
        f"rate ({' / '.join(names)}) | seeds | where |",
        "|---|---|" + "---|" * (len(ARMS) + len(DIFFERENCES) + 4),
    ]
    for task in tasks:
        sizes = sorted(
            {size for t, size, _ in cells if t == task},
            key=lambda size: math.inf if size is None else size,
        )
        for size in sizes:
            row = {arm: cells.get((task, size, arm), {}) for arm in ARMS}
            runs = [r for cell in row.values() for r in cell.values()]
            values = [
                _fmt(_mean_sd([_metric(r) for r in row[arm].values()]))
                for arm in ARMS
            ]
            differences = [
                _fmt_interval(paired_difference(row[a], row[b]))
                for a, b in DIFFERENCES
            ]
            lines.append(
                f"| {task} ({runs[0]['main_metric']}) | {size or 'all'} | "
                + " | ".join(values + differences)
                + f" | {' / '.join(_mean_time(row[a]) for a in ARMS)} | "
                f"{' / '.join(_rates(row[a]) for a in ARMS)} | "
                f"{' / '.join(str(len(row[a])) for a in ARMS)} | "
                f"{_where(runs)} |"
            )
    return "\n".join(lines)


def small_data_report(records):
    return _plateau_report(
        records,
        "small-data",
        "Mean ± standard deviation over seeds; a difference is the mean "
        "of the per-seed differences (the same subset for every method at "
        "a seed) with its 95% Student t interval; training time includes "
        "the held-out loss of each epoch and every epoch run, past the "
        "best one too.",
        small_data_table(records),
    )


def small_data_plot(records, path):
    """Per task, the dev metric against the training-set size (log x), a
    line per method, error bars the 95% interval of the mean."""
    cells, tasks = plateau_cells(records, "small-data")
    tasks = [t for t in tasks if any(key[0] == t for key in cells)]
    figure, axes = _panels(len(tasks), 3.8)
    for axis, task in zip(axes[0], tasks):
        for arm in ARMS:
            points = sorted(
                (size, mean_interval(_metric(r) for r in cell.values()))
                for (t, size, a), cell in cells.items()
                if t == task and a == arm and size is not None
            )
            if not points:
                continue
            sizes = [size for size, _ in points]
            means = [100 * interval[0] for _, interval in points]
            # One seed has no interval: no bar.
            errors = [
                0.0 if math.isnan(i[1]) else 100 * i[1] for _, i in points
            ]
            axis.errorbar(
                sizes,
                means,
                yerr=errors,
                marker="o",
                capsize=3,
                label=ARM_NAMES[arm],
            )
        metric = next(
            next(iter(cell.values()))["main_metric"]
            for key, cell in cells.items()
            if key[0] == task
        )
        axis.set_xscale("log")
        axis.set_title(f"{task} ({metric})")
        axis.set_xlabel("training examples")
        axis.grid(alpha=0.3)
    _save(figure, axes, "dev metric x100 (mean, 95% interval)", path)


def pilot_table(records):
    """Every grid point of the pilot: its held-out loss (the choice's
    criterion), best epochs and dev metric (means over seeds), the chosen
    learning rate of each task and method marked."""
    pilot = [r for r in records if r.get("study") == "pilot"]
    chosen = chosen_learning_rates(pilot)
    relabeled, tasks = by_variant(pilot)
    points = {}
    for original, record in zip(pilot, relabeled):
        arm = arm_of(original)
        rate = original["changes"]["learning_rate"]
        key = _pilot_key(original["task"], arm, original["changes"])
        point = points.setdefault(
            (record["task"], arm, rate), {"chosen": chosen[key] == rate}
        )
        point.setdefault("runs", []).append(record)
    lines = [
        "| task (metric x100) | method | learning rate | held-out loss | "
        "best epochs | dev metric | seeds | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in tasks:
        for arm in ARMS:
            rates = sorted(r for t, a, r in points if t == task and a == arm)
            for rate in rates:
                point = points[task, arm, rate]
                runs = point["runs"]
                loss = statistics.fmean(final_stopping_loss(r) for r in runs)
                epochs = "; ".join(_best_epochs(r) for r in runs)
                dev = _mean_sd([_metric(r) for r in runs])
                lines.append(
                    f"| {task} ({runs[0]['main_metric']}) | "
                    f"{ARM_NAMES[arm]} | {rate:g} | {loss:.4f} | {epochs} | "
                    f"{_fmt(dev)} | {len(runs)} | "
                    f"{'**chosen**' if point['chosen'] else ''} |"
                )
    return "\n".join(lines)


def _best_epochs(record):
    """E.g. `bilevel 4, retrain 2`."""
    best = record.get("best_epochs") or {}
    return ", ".join(f"{phase} {epoch}" for phase, epoch in best.items())


def pilot_report(records):
    return _plateau_report(
        records,
        "pilot",
        "The learning rate of a task and method is the one of the lowest "
        "held-out loss (of the last phase: BiDoRA's retrain), never the "
        "dev metric's; floors and small-data train at it.",
        pilot_table(records),
    )


def floor_results(records):
    """`{task: (metric, floor, (mean, sd), {seed: run}, passed)}`: the
    floors study's LoRA runs, per task as `by_variant` names it."""
    cells, tasks = plateau_cells(records, "floors")
    results = {}
    for task in tasks:
        runs = cells.get((task, None, "lora"), {})
        if not runs:
            continue
        metric, floor = FLOORS[task.split(",")[0]]
        values = _mean_sd([r["dev"][metric] for r in runs.values()])
        results[task] = (metric, floor, values, runs, values[0] >= floor)
    return results


def floors_table(records):
    lines = [
        "| task | metric | floor (x100) | LoRA (x100) | seeds | learning "
        "rate | result | where |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, (metric, floor, values, runs, passed) in floor_results(
        records
    ).items():
        result = "pass" if passed else "fail (dropped: floor not reached)"
        lines.append(
            f"| {task} | {metric} | {100 * floor:.0f} | {_fmt(values)} | "
            f"{len(runs)} | {_rates(runs)} | {result} | "
            f"{_where(runs.values())} |"
        )
    return "\n".join(lines)


def floors_report(records):
    return _plateau_report(
        records,
        "floors",
        "LoRA on each task's full training set (or its --train-sample) "
        "at its pilot learning rate; a task whose mean misses its floor is "
        "dropped from the small-data study.",
        floors_table(records),
    )


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        write_report(args)
        return 0
    return run_study(args)


if __name__ == "__main__":
    sys.exit(main())
