"""Training cost of LoRA, DoRA and BiDoRA against Keras's built-in LoRA.

Each row runs in its own process (so that its peak memory is its own) on
the pretrained MiniLM-L6 BERT classifier, batch 16, sequence 128, rank 8,
query/value adapted, AdamW at both levels. A row trains with `fit` on fixed
random token ids; a callback reads each step's loss (which waits for the
step to finish) and times it. `step_s` is the median over the timed steps
after the warm-up steps (compilation included there); for a BiDoRA row with
`upper_every=k`, warm-up and timed steps are whole cycles of `k` steps and
`step_s` is the median cycle's time divided by `k`, so that it includes the
upper steps' share; `page_faults_per_step` is the median step's count of
minor page faults (memory the step mapped afresh and touched).
`bidora_int8_first_order_k1` trains the same BiDoRA on a backbone
quantized to int8 first (`backbone.quantize("int8")`);
`bidora_first_order_proportional_k1` takes upper batches sized to the upper
split (`upper_batch_size="proportional"`, 4 samples at batch 16). Every
training row is printed with its ratio to `keras_lora` measured in the same
run, and the inference rows with their ratio to `base_inference`. On a
shared machine, `--rounds N` runs the list of rows N times, in turn, and
pools each row's timed steps, so that a change in the machine's load weighs
on every row alike; `--one-process` builds the training rows in one process
and times them in turn in each round (in reverse order in odd rounds), so
that rows are no longer minutes apart, at the cost of their peak memory.
Rows with a target (`TARGETS`) carry `target` and `target_met`, and the
`.md` table lists the missed targets with what is known to be left there.

Usage:

    python benchmarks/speed.py --quick                 # all backends
    python benchmarks/speed.py --backend jax --json    # one backend
    python benchmarks/speed.py --backend torch --quick --rounds 3
    python benchmarks/speed.py --backend torch --quick --one-process \
        --rounds 4 --rows keras_lora dora bidora_first_order_k1

Results go to `benchmarks/results/speed-<backend>.json` and `.md`, or, for
another shape than the default batch 16 x sequence 128, to
`speed-<backend>-b<batch>-s<length>.json` and `.md` (e.g. the small shapes
where per-step overhead dominates: `--batch-size 4 --sequence-length 32`
and `--batch-size 1 --sequence-length 8`). BiDoRA rows also carry their
ratio to the `dora` row of the same run (`vs dora` in the table): a
`first_order` step makes two passes, so about 2x is its floor.
"""

import argparse
import itertools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from keras_bidora.config import BACKENDS
from keras_bidora.config import HYPERGRADIENTS
from keras_bidora.config import UPPER_BATCH_SIZE_PROPORTIONAL

ROWS = (
    "keras_lora",
    "lora",
    "dora",
    "dora_detach_norm",
    "bidora_first_order_k1",
    "bidora_first_order_proportional_k1",
    "bidora_first_order_k4",
    "bidora_darts_k1",
    "bidora_darts_k4",
    "bidora_darts_forward_k1",
    "bidora_neumann_k1",
    "bidora_int8_first_order_k1",
    "base_inference",
    "merged_inference",
)
# The default shape: a batch of 16 sequences of 128 tokens.
BATCH_SIZE = 16
LENGTH = 128
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _peak_mb():
    """Peak device memory where there is an accelerator, else peak RSS."""
    import keras

    backend = keras.config.backend()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform != "cpu":
            return device.memory_stats()["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _data(batch_size, sequence_length, steps, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    n = batch_size * steps
    x = {
        "token_ids": rng.integers(1000, 30000, (n, sequence_length)).astype(
            "int32"
        ),
        "segment_ids": np.zeros((n, sequence_length), "int32"),
        "padding_mask": np.ones((n, sequence_length), "bool"),
    }
    y = rng.integers(0, 2, (n,)).astype("int32")
    return x, y


class _StepTimer:
    def __init__(self):
        import keras

        class Timer(keras.callbacks.Callback):
            def on_train_batch_begin(inner, batch, logs=None):
                inner.faults = _minor_faults()
                inner.start = time.perf_counter()

            def on_train_batch_end(inner, batch, logs=None):
                float(keras.ops.convert_to_numpy(logs["loss"]))
                self.times.append(time.perf_counter() - inner.start)
                self.faults.append(_minor_faults() - inner.faults)

        self.times = []
        self.faults = []
        self.callback = Timer()


def _minor_faults():
    """The process's minor page faults so far (`getrusage`'s `ru_minflt`).

    A step that maps fresh memory faults on each page it touches: CPython's
    frame-stack chunks (`keras_bidora.training.frame_stack`) showed here.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _classifier():
    import keras_hub

    from keras_bidora.data.preprocessing import default_preset

    backbone = keras_hub.models.BertBackbone.from_preset(default_preset())
    return keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=2, preprocessor=None, dropout=0.1
    )


def run_row(name, batch_size, sequence_length, warmup, steps):
    """Runs one row in this process and returns its measurements."""
    if name.endswith("inference"):
        return _run_inference_row(
            name, batch_size, sequence_length, warmup, steps
        )
    return _timed_fit(
        _training_row(name, batch_size, sequence_length, warmup, steps)
    )


def run_rows_in_turn(names, rounds, batch_size, sequence_length, warmup, steps):
    """Builds the training rows in this process, then times them in turn.

    Each round fits every row once (`warmup` + `steps` steps), in the order
    given in even rounds and reversed in odd ones, so that a drift of the
    machine's speed within the run weighs on every row alike.

    Returns:
        One result per row and round, each with the row's `name`.
    """
    _check_training_rows(names)
    rows = {
        name: _training_row(name, batch_size, sequence_length, warmup, steps)
        for name in names
    }
    results = []
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            results.append({"name": name, **_timed_fit(rows[name])})
    return results


def _check_training_rows(names):
    """Raises a ValueError quoting the inference rows among `names`."""
    inference = [name for name in names if name.endswith("inference")]
    if inference:
        raise ValueError(
            "--one-process times training rows only. Received inference "
            f"rows: {inference}"
        )


def _run_inference_row(name, batch_size, sequence_length, warmup, steps):
    import keras
    import numpy as np

    import keras_bidora

    keras.utils.set_random_seed(0)
    model = _classifier()
    x, _ = _data(batch_size, sequence_length, warmup + steps)
    if name == "merged_inference":
        wrapper = keras_bidora.BiDoRAModel(model, rank=8, alpha=16)
        model = keras_bidora.merge(wrapper)
    batch = {k: v[:batch_size] for k, v in x.items()}
    # Inference steps are short: time more of them.
    steps = 6 * steps
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        np.asarray(model.predict_on_batch(batch))
        times.append(time.perf_counter() - start)
    return {"times": times[warmup:], "steps_timed": steps}


def _training_row(name, batch_size, sequence_length, warmup, steps):
    """A compiled trainer for the row, its data and its step counts."""
    import keras

    import keras_bidora

    keras.utils.set_random_seed(0)
    model = _classifier()
    cycle = 1
    if name.startswith("bidora"):
        cycle = _bidora_spec(name)["upper_every"]
        warmup = math.ceil(warmup / cycle) * cycle
        steps = math.ceil(steps / cycle) * cycle
    total = warmup + steps
    x, y = _data(batch_size, sequence_length, total)
    if name == "keras_lora":
        model.backbone.enable_lora(8)
        trainer = model
    elif name in ("lora", "dora", "dora_detach_norm"):
        keras_bidora.inject(
            model,
            rank=8,
            alpha=16,
            magnitude=name != "lora",
            detach_norm=name == "dora_detach_norm",
        )
        trainer = model
    else:
        spec = _bidora_spec(name)
        if spec["int8"]:
            # The frozen backbone in int8, dequantized in each adapted call.
            model.backbone.quantize("int8")
        trainer = keras_bidora.BiDoRAModel(
            model,
            rank=8,
            alpha=16,
            hypergradient=spec["hypergradient"],
            upper_every=spec["upper_every"],
            upper_batch_size=spec["upper_batch_size"],
            seed=0,
        )
        # fit holds out upper_fraction (0.2) of the samples: 5 batches of
        # samples per 4 lower steps keep both splits in whole batches, so
        # that no timed step has a short batch (on JAX, a new shape
        # compiles again). The upper split's batches are always full (its
        # last one wraps around), proportional ones included.
        x, y = _data(batch_size, sequence_length, 5 * math.ceil(total / 4))
    trainer.compile(
        optimizer=keras.optimizers.AdamW(1e-4, weight_decay=0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return {
        "trainer": trainer,
        "x": x,
        "y": y,
        "batch_size": batch_size,
        "cycle": cycle,
        "warmup": warmup,
        "total": total,
    }


def _timed_fit(row):
    """One epoch of `fit` on the row's data, its steps timed after warm-up."""
    import numpy as np

    trainer, warmup, total = row["trainer"], row["warmup"], row["total"]
    timer = _StepTimer()
    trainer.fit(
        row["x"],
        row["y"],
        batch_size=row["batch_size"],
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[timer.callback],
    )
    trainable = sum(int(np.prod(v.shape)) for v in trainer.trainable_weights)
    timed = timer.times[warmup:total]
    return {
        # Per step of each whole cycle of `upper_every` steps.
        "times": _per_cycle(timed, row["cycle"]),
        "faults": _per_cycle(timer.faults[warmup:total], row["cycle"]),
        "steps_timed": len(timed),
        "trainable_params": trainable,
    }


def _per_cycle(values, cycle):
    return [
        sum(values[i : i + cycle]) / cycle for i in range(0, len(values), cycle)
    ]


def _bidora_spec(name):
    """The BiDoRA settings a row's name gives.

    A name is `bidora_[int8_]<hypergradient>[_proportional]_k<upper_every>`.

    Example:

    >>> _bidora_spec("bidora_int8_first_order_proportional_k1")["int8"]
    True
    """
    words = name.split("_")
    if words[0] != "bidora" or not words[-1][1:].isdigit():
        raise ValueError(
            "A BiDoRA row is named bidora_[int8_]<hypergradient>"
            f"[_proportional]_k<upper_every>. Received: {name!r}"
        )
    upper_every = int(words[-1][1:])
    words = words[1:-1]
    int8 = words[:1] == ["int8"]
    words = words[int8:]
    proportional = words[-1:] == [UPPER_BATCH_SIZE_PROPORTIONAL]
    words = words[: len(words) - proportional]
    hypergradient = "_".join(words)
    if hypergradient not in HYPERGRADIENTS:
        raise ValueError(
            f"The row {name!r} names no hypergradient of {HYPERGRADIENTS}."
        )
    return {
        "int8": int8,
        "hypergradient": hypergradient,
        "upper_every": upper_every,
        "upper_batch_size": UPPER_BATCH_SIZE_PROPORTIONAL
        if proportional
        else None,
    }


def _row_main(args):
    if args.one_process_rows:
        # The process's peak memory is every row's: none is reported.
        for result in run_rows_in_turn(
            args.rows,
            args.rounds,
            args.batch_size,
            args.sequence_length,
            args.warmup,
            args.steps,
        ):
            print("RESULT " + json.dumps({**result, "peak_mb": None}))
        return
    result = run_row(
        args.row,
        args.batch_size,
        args.sequence_length,
        args.warmup,
        args.steps,
    )
    result["peak_mb"] = _peak_mb()
    print("RESULT " + json.dumps({**result, "name": args.row}))


def _child_results(backend, args, what):
    """Runs this script with `what` (its row arguments) under `backend`;
    returns the results it prints."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        *what,
        "--batch-size",
        str(args.batch_size),
        "--sequence-length",
        str(args.sequence_length),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
    ]
    env = {**os.environ, "KERAS_BACKEND": backend}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [
        line for line in done.stdout.splitlines() if line.startswith("RESULT ")
    ]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"rows {what} failed on {backend}")
    return [json.loads(line[len("RESULT ") :]) for line in lines]


def _measurements(backend, args):
    """Each row's results: a process per row and round, or one process."""
    if args.one_process:
        yield from _child_results(
            backend,
            args,
            ["--one-process-rows", "--rows", *args.rows, "--rounds"]
            + [str(args.rounds)],
        )
        return
    for _, name in itertools.product(range(args.rounds), args.rows):
        (result,) = _child_results(backend, args, ["--row", name])[-1:]
        yield {**result, "name": name}


def run_backend(backend, args):
    results = {
        name: {"times": [], "faults": [], "steps_timed": 0, "peak_mb": None}
        for name in args.rows
    }
    for result in _measurements(backend, args):
        name = result["name"]
        pooled = results[name]
        pooled["times"] += result["times"]
        pooled["faults"] += result.get("faults", [])
        pooled["steps_timed"] += result["steps_timed"]
        if result["peak_mb"] is not None:
            pooled["peak_mb"] = max(pooled["peak_mb"] or 0.0, result["peak_mb"])
        pooled["trainable_params"] = result.get("trainable_params")
        if not args.json:
            step_s = statistics.median(result["times"])
            print(f"  {backend:10s} {name:24s} {step_s:.4f} s")
    rows = [
        {
            "name": name,
            "backend": backend,
            "step_s": statistics.median(result["times"]),
            "step_s_min": min(result["times"]),
            "steps_timed": result["steps_timed"],
            "peak_mb": None
            if result["peak_mb"] is None
            else round(result["peak_mb"], 1),
            "trainable_params": result["trainable_params"],
            "page_faults_per_step": statistics.median(result["faults"])
            if result["faults"]
            else None,
        }
        for name, result in results.items()
    ]
    by_name = {row["name"]: row for row in rows}
    for row in rows:
        reference = _reference(row["name"])
        if reference in by_name:
            reference_s = by_name[reference]["step_s"]
            ratio = round(row["step_s"] / reference_s, 3)
            row[f"ratio_to_{reference}"] = ratio
            # Kept with the row: a later run may replace the reference row.
            row["reference_step_s"] = reference_s
        if row["name"].startswith("bidora") and "dora" in by_name:
            row["ratio_to_dora"] = round(
                row["step_s"] / by_name["dora"]["step_s"], 3
            )
        _add_target(row)
    return rows


def _reference(name):
    return "base_inference" if name.endswith("inference") else "keras_lora"


# The targets of the rows that have one, as (lowest, highest) ratio to the
# row's reference, and what is known to be left where a row misses it.
TARGETS = {
    "dora": (
        None,
        1.1,
        "A DoRA step is a LoRA step plus each layer's column norm, "
        "O(in * out * rank) and expanded in the low-rank factors (no "
        "(in, out) temporary). At small shapes on torch what is left is "
        "op dispatch: a DoRA call is 12 `keras.ops` calls, against about 5 "
        "for Keras LoRA "
        "(benchmarks/README.md, 'Where the time goes'). Step times on "
        "the 2-core machine move by 20-40% between runs: use --rounds.",
    ),
    "bidora_first_order_k1": (
        None,
        2.1,
        "A `first_order` step makes two forward+backward passes (see `vs "
        "dora`), and the lower one adds the orthogonality penalty, whose "
        "cost does not shrink with the batch (about 5 ms for its value and "
        "gradient over MiniLM's 12 adapted layers, one stacked group, on "
        "torch and 2 CPU cores; 16-18 ms layer by layer). Its passes "
        "compute the column norms once per group of layers "
        "(`shared_column_scales`), where the `dora` row computes them "
        "layer by layer; what is left is the passes' own op dispatch, "
        "and run-to-run drift of a few percent on the 2-core machine "
        "(benchmarks/README.md, 'Where the time goes').",
    ),
    "bidora_first_order_k4": (
        None,
        1.4,
        "One upper pass every 4 steps: the pass count predicts 1.25x. The "
        "excess over that was not traced further; 5 timed cycles on a "
        "shared 2-core machine spread by several percent (`--rounds N` "
        "pools interleaved repeats).",
    ),
    "bidora_darts_k1": (
        None,
        3.0,
        "A `darts` step makes 4 forward+backward passes (the lower pass, "
        "the upper pass at the virtual step, the lower pass at w +/- "
        "eps*v): 4.0x DoRA's FLOPs in XLA's cost analysis, and a DoRA pass "
        "costs about a Keras LoRA step, so it cannot get under 3x while it "
        "makes 4 passes. `darts_forward` makes 3, `first_order` (the "
        "default) 2; benchmarks/README.md, 'Where the time goes'.",
    ),
    "merged_inference": (
        0.95,
        1.05,
        "The merged model is the base model's architecture with other "
        "kernel values, so a miss is timing noise or a change in merging: "
        "rerun with `--rounds N`.",
    ),
}


def _add_target(row):
    """Adds `target` (text) and `target_met` to a row that has a target."""
    if row["name"] not in TARGETS:
        return row
    low, high, _ = TARGETS[row["name"]]
    row["target"] = f"<= {high}" if low is None else f"{low}-{high}"
    ratio = row.get(f"ratio_to_{_reference(row['name'])}")
    if ratio is None:
        row["target_met"] = None
    else:
        row["target_met"] = (low is None or ratio >= low) and ratio <= high
    return row


def _markdown(rows, args):
    lines = [
        f"Backend `{rows[0]['backend']}`, {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} cores; batch {args.batch_size}, sequence "
        f"{args.sequence_length}, {args.warmup} warm-up + {args.steps} timed "
        "steps per row (whole `upper_every` cycles for BiDoRA rows), "
        f"{args.rounds} round(s)"
        + (", all rows in one process." if args.one_process else "."),
        "",
        "| row | median step (s) | ratio | target | reference step in the "
        "same run (s) | vs dora | peak memory (MB) | trainable | page "
        "faults / step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    missed = []
    for row in rows:
        _add_target(row)
        ratio = row.get(f"ratio_to_{_reference(row['name'])}")
        reference = row.get("reference_step_s")
        reference = "" if reference is None else f"{reference:.4f}"
        target = row.get("target", "")
        if row.get("target_met") is not None:
            target += " met" if row["target_met"] else " MISSED"
        if row.get("target_met") is False:
            missed.append(f"- `{row['name']}`: {TARGETS[row['name']][2]}")
        lines.append(
            f"| {row['name']} | {row['step_s']:.4f} | {ratio} | {target} "
            f"| {reference} | {row.get('ratio_to_dora', '')} "
            f"| {_or_blank(row['peak_mb'])} | "
            f"{row['trainable_params'] or ''} "
            f"| {_or_blank(row.get('page_faults_per_step'))} |"
        )
    if missed:
        lines += ["", "Missed targets, and what is left:", ""] + missed
    return "\n".join(lines) + "\n"


def _or_blank(value):
    return "" if value is None else value


def _stem(backend, args):
    """The results files' name: one pair of files per backend and shape."""
    if (args.batch_size, args.sequence_length) == (BATCH_SIZE, LENGTH):
        return f"speed-{backend}"
    return f"speed-{backend}-b{args.batch_size}-s{args.sequence_length}"


def _save(backend, rows, args):
    """Writes the rows, replacing same-named rows of an earlier run.

    Each row keeps the command that measured it; ratios are always taken
    within one run.
    """
    os.makedirs(RESULTS, exist_ok=True)
    stem = _stem(backend, args)
    path = os.path.join(RESULTS, f"{stem}.json")
    merged = {}
    if os.path.exists(path):
        with open(path) as f:
            merged = {row["name"]: row for row in json.load(f)}
    for row in merged.values():
        # Rows saved before rows kept their reference: it is the reference
        # row of the same command, if that row is still on file.
        reference = merged.get(_reference(row["name"]))
        if (
            "reference_step_s" not in row
            and reference is not None
            and reference["command"] == row["command"]
        ):
            row["reference_step_s"] = reference["step_s"]
    merged.update({row["name"]: row for row in rows})
    rows = [_add_target(merged[name]) for name in ROWS if name in merged]
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    commands = sorted({row["command"] for row in rows})
    with open(os.path.join(RESULTS, f"{stem}.md"), "w") as f:
        f.write("Commands: " + ", ".join(f"`{c}`" for c in commands) + "\n\n")
        f.write(_markdown(rows, args))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=BACKENDS)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 warm-up and 5 timed steps per row",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per row"
    )
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--sequence-length", type=int, default=LENGTH)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the rows this many times in turn and pool their steps",
    )
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument(
        "--no-save", action="store_true", help="don't write benchmarks/results/"
    )
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="build the training rows in one process and time them in "
        "turn, round by round (ratios less exposed to the machine's drift "
        "between processes; no peak memory per row)",
    )
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument(
        "--one-process-rows", action="store_true", help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = 3
    if args.steps is None:
        args.steps = 5 if args.quick else 20
    if args.row or args.one_process_rows:
        return _row_main(args)
    if args.one_process:
        try:
            _check_training_rows(args.rows)
        except ValueError as error:
            parser.error(str(error))
    command = " ".join(["python", "benchmarks/speed.py"] + sys.argv[1:])
    for backend in [args.backend] if args.backend else BACKENDS:
        rows = run_backend(backend, args)
        for row in rows:
            row["command"] = command
            if args.json:
                print(json.dumps(row))
        if not args.no_save:
            rows = _save(backend, rows, args)
        if not args.json:
            print(_markdown(rows, args))


if __name__ == "__main__":
    main()
