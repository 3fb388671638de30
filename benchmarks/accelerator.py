"""Step time and peak device memory of LoRA-family fine-tuning on one device.

The model is a KerasHub `Llama3CausalLM` with random weights, shaped like
Llama 3.2 1B (vocabulary 128256, 16 layers, hidden 2048, 32 query heads,
8 key/value heads, intermediate 8192, tied embeddings: 1.24B parameters),
under the `bfloat16` dtype policy (weights, adapters and compute in
bfloat16). Every row adapts the attention's query and value projections
with rank 8 and trains with AdamW (learning rate 1e-4) on random tokens:

- `keras_lora`: Keras's own LoRA, `backbone.enable_lora(rank)`;
- `lora`: `keras_bidora.inject(causal_lm, rank=rank, magnitude=False)`;
- `dora`: `keras_bidora.inject(causal_lm, rank=rank)` (magnitudes train);
- `first_order`, `darts`: `keras_bidora.BiDoRAModel` with that
  hypergradient (an upper step after every lower step; a fifth of the
  samples held out for the upper level, so that every row trains the same
  number of lower batches).

The first three train with `keras.Model.fit` called on the task
(`keras.Model.fit(causal_lm, x, y)`), token arrays in and no preprocessor,
so that KerasHub's input pipeline (which needs TensorFlow or grain) is not
used; `BiDoRAModel.fit` takes the same arrays. No row needs TensorFlow.

`--peers` adds `peft_lora` and `peft_dora`: PEFT's LoRA and DoRA
(`peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj",
"v_proj"], use_dora=...)`) on a transformers `LlamaForCausalLM` of the same
shape in bfloat16, trained by a plain torch loop (AdamW on the trainable
parameters, loss from the model's `labels=`) with the same batch size,
sequence length and steps. PEFT keeps its adapters in float32 on a bfloat16
model (its `autocast_adapter_dtype` default); each row records its
adapters' dtype. These rows need `peft` and `transformers`; when either is
missing, one line on stderr names it and the rows are skipped.

Each row runs in its own process (the backend is fixed at import, and JAX's
peak memory counter cannot be reset) and records the median step time over
the timed steps, the times of the warm-up steps before them (compilation
on JAX), the peak device memory (`memory_stats()` on JAX,
`torch.cuda.max_memory_allocated()` on torch; the process's peak resident
memory where the device reports none, as on a CPU), the trainable and total
parameter counts, the backend, the device, the library versions and the
date. The rows go to stdout as JSON lines, and, rewritten after every row,
to `accelerator.jsonl` and `accelerator.md` (a table with each row's ratio
to Keras LoRA on the same backend in the same run) in `--output`.

Usage:

    python benchmarks/accelerator.py --peers              # the whole table
    python benchmarks/accelerator.py --backends torch --methods lora,darts
    python benchmarks/accelerator.py --peers --tiny       # CPU smoke test

`--tiny` swaps in a 2-layer model (hidden 32), 1 warm-up and 2 timed steps,
to check on a CPU that the script runs. Its results go to a new temporary
folder (named on stderr) unless `--output` is given, so that it never
replaces the committed `benchmarks/results/accelerator.*`.
"""

import argparse
import datetime
import functools
import importlib.util
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time

# Keras's own LoRA first: the other rows' ratios are to it.
KERAS_ROWS = ("keras_lora", "lora", "dora", "first_order", "darts")
# The rows that train a BiDoRAModel (and hold out a fifth of their data).
BILEVEL_ROWS = ("first_order", "darts")
PEER_ROWS = ("peft_lora", "peft_dora")
PEER_PACKAGES = ("peft", "transformers")
IMPLEMENTATIONS = {
    "keras_lora": "Keras LoRA (`backbone.enable_lora`)",
    "lora": "keras-bidora LoRA (`inject`, `magnitude=False`)",
    "dora": "keras-bidora DoRA (`inject`)",
    "first_order": "keras-bidora BiDoRA, `first_order`",
    "darts": "keras-bidora BiDoRA, `darts`",
    "peft_lora": "PEFT LoRA (transformers Llama)",
    "peft_dora": "PEFT DoRA (transformers Llama)",
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

FULL = {
    "model": {
        "vocabulary_size": 128256,
        "num_layers": 16,
        "num_query_heads": 32,
        "hidden_dim": 2048,
        "intermediate_dim": 8192,
        "num_key_value_heads": 8,
        "rope_max_wavelength": 500000,
        "tie_word_embeddings": True,
    },
    "batch_size": 8,
    "sequence_length": 512,
    "warmup_steps": 2,
    "timed_steps": 5,
}
TINY = {
    "model": {
        "vocabulary_size": 256,
        "num_layers": 2,
        "num_query_heads": 4,
        "hidden_dim": 32,
        "intermediate_dim": 64,
        "num_key_value_heads": 2,
        "rope_max_wavelength": 500000,
        "tie_word_embeddings": True,
    },
    "batch_size": 4,
    "sequence_length": 16,
    "warmup_steps": 1,
    "timed_steps": 2,
}


# One row, in its own process ------------------------------------------


def _device(backend):
    if backend == "jax":
        import jax

        return jax.devices()[0].device_kind
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def _peak_memory(backend):
    """`(bytes, source)`: the device's peak, else the process's peak RSS."""
    if backend == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return stats["peak_bytes_in_use"], "device"
    else:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated(), "device"
    # ru_maxrss is in kilobytes on Linux.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return rss, "host_rss"


def _versions(modules):
    versions = {}
    for name in modules:
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", None)
    return versions


def _tokens(settings, samples):
    """Seeded random token ids, `(samples, sequence_length + 1)`."""
    import numpy as np

    rng = np.random.default_rng(0)
    vocabulary = settings["model"]["vocabulary_size"]
    shape = (samples, settings["sequence_length"] + 1)
    return rng.integers(0, vocabulary, shape).astype("int32")


def causal_lm_data(settings, samples):
    """`(x, y)` of `samples` sequences: token ids, their padding mask (all
    ones) and the next tokens."""
    import numpy as np

    tokens = _tokens(settings, samples)
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.ones_like(tokens[:, :-1]),
    }
    return x, tokens[:, 1:]


def parameter_counts(model):
    """`{"trainable_parameters": ..., "parameters": ...}` of `model`."""
    return {
        "trainable_parameters": sum(
            math.prod(v.shape) for v in model.trainable_variables
        ),
        "parameters": sum(math.prod(v.shape) for v in model.weights),
    }


def _summary(times, settings):
    """The timing fields of a row from every step's time."""
    import numpy as np

    warmup = settings["warmup_steps"]
    return {
        "step_time_s": float(np.median(times[warmup:])),
        "warmup_step_times_s": [round(t, 4) for t in times[:warmup]],
        "step_times_s": [round(t, 4) for t in times],
    }


class _StepTimer:
    """Times each Keras train step, waiting for its result first."""

    def __init__(self):
        import keras

        timer = self

        class Timer(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                self.start = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                # Reading the loss waits for the asynchronous step to finish.
                loss = float(keras.ops.convert_to_numpy(logs["loss"]))
                timer.times.append(time.perf_counter() - self.start)
                timer.losses.append(loss)

        self.times = []
        self.losses = []
        self.callback = Timer()


def _keras_trainer(causal_lm, method, rank):
    """Adapts `causal_lm` for `method`; returns the model to compile."""
    import keras_bidora

    if method == "keras_lora":
        causal_lm.backbone.enable_lora(rank)
        return causal_lm
    if method in ("lora", "dora"):
        keras_bidora.inject(causal_lm, rank=rank, magnitude=method == "dora")
        return causal_lm
    return keras_bidora.BiDoRAModel(
        causal_lm, rank=rank, hypergradient=method, seed=0
    )


def keras_model(method, settings, rank, dtype):
    """The row's compiled Keras model: a seeded `Llama3CausalLM` of the
    settings' shape under the `dtype` policy, adapted for `method`."""
    import keras
    import keras_hub

    keras.config.set_dtype_policy(dtype)
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Llama3Backbone(**settings["model"])
    causal_lm = keras_hub.models.Llama3CausalLM(
        backbone=backbone, preprocessor=None
    )
    model = _keras_trainer(causal_lm, method, rank)
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def run_keras_row(backend, method, settings, rank, dtype):
    """Trains a Keras row for a few steps; returns its JSON fields."""
    import keras

    model = keras_model(method, settings, rank, dtype)
    batch_size = settings["batch_size"]
    samples = batch_size * (settings["warmup_steps"] + settings["timed_steps"])
    bilevel = method in BILEVEL_ROWS
    if bilevel:
        # BiDoRA holds out a fifth of the samples for the upper level.
        samples = samples * 5 // 4
    x, y = causal_lm_data(settings, samples)
    # KerasHub's CausalLM.fit would send the arrays through its input
    # pipeline (tf.data or grain); Keras's own fit takes them as they are.
    fit = model.fit if bilevel else functools.partial(keras.Model.fit, model)
    timer = _StepTimer()
    fit(
        x,
        y,
        batch_size=batch_size,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[timer.callback],
    )
    return {
        **_summary(timer.times, settings),
        "loss": timer.losses[-1],
        **parameter_counts(model),
        "adapter_dtype": str(model.trainable_variables[0].dtype),
        "device": _device(backend),
        "versions": _versions(("keras", "keras_hub", backend)),
    }


def _peer_model(settings, rank, dtype, use_dora, device):
    """transformers' Llama of `settings`' shape, with PEFT's adapters."""
    import peft
    import torch
    import transformers

    shape = settings["model"]
    config = transformers.LlamaConfig(
        vocab_size=shape["vocabulary_size"],
        num_hidden_layers=shape["num_layers"],
        hidden_size=shape["hidden_dim"],
        num_attention_heads=shape["num_query_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        intermediate_size=shape["intermediate_dim"],
        rope_theta=shape["rope_max_wavelength"],
        tie_word_embeddings=shape["tie_word_embeddings"],
        max_position_embeddings=max(settings["sequence_length"], 2048),
        use_cache=False,
    )
    torch.manual_seed(0)
    # Built on the device: initialising 1.24B weights on the host is slow.
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, dtype)
        )
    adapters = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "v_proj"],
        use_dora=use_dora,
    )
    return peft.get_peft_model(model, adapters)


def run_peer_row(method, settings, rank, dtype):
    """Trains a PEFT row with a plain torch loop; returns its JSON fields."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = _peer_model(
        settings, rank, dtype, method == "peft_dora", torch.device(device)
    )
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch_size = settings["batch_size"]
    steps = settings["warmup_steps"] + settings["timed_steps"]
    tokens = torch.from_numpy(_tokens(settings, batch_size * steps))
    # Labels are the inputs: the model shifts them itself.
    tokens = tokens[:, :-1].long().to(device)

    times, losses = [], []
    for step in range(steps):
        batch = tokens[step * batch_size : (step + 1) * batch_size]
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {
        **_summary(times, settings),
        "loss": losses[-1],
        "trainable_parameters": sum(p.numel() for p in trainable),
        "parameters": sum(p.numel() for p in model.parameters()),
        "adapter_dtype": str(trainable[0].dtype).removeprefix("torch."),
        "attention": getattr(model.config, "_attn_implementation", None),
        "device": _device("torch"),
        "versions": _versions(("torch", "transformers", "peft")),
    }


def run_row(backend, method, settings, rank, dtype):
    """One row: its fields, with the run's settings and the date."""
    if method in PEER_ROWS:
        fields = run_peer_row(method, settings, rank, dtype)
    else:
        fields = run_keras_row(backend, method, settings, rank, dtype)
    peak, source = _peak_memory(backend)
    return {
        "method": method,
        "implementation": IMPLEMENTATIONS[method],
        "backend": backend,
        **fields,
        "peak_memory_bytes": peak,
        "peak_memory_source": source,
        "rank": rank,
        "dtype": dtype,
        "batch_size": settings["batch_size"],
        "sequence_length": settings["sequence_length"],
        "warmup_steps": settings["warmup_steps"],
        "timed_steps": settings["timed_steps"],
        "date": _now(),
    }


def _now():
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.isoformat(timespec="seconds")


# The run: one process per row, then the results files -----------------


def missing_peer_packages():
    """The names of the `--peers` packages that are not installed."""
    return [
        name for name in PEER_PACKAGES if importlib.util.find_spec(name) is None
    ]


def planned_rows(backends, methods, peers):
    """`(backend, method)` for each row of the run, in order."""
    rows = [(backend, m) for backend in backends for m in methods]
    if peers:
        rows += [("torch", method) for method in PEER_ROWS]
    return rows


def _row_process(backend, method, args):
    """Runs one row in a child process; returns its row or a failed row."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--row",
        method,
        "--backends",
        backend,
        "--rank",
        str(args.rank),
        "--dtype",
        args.dtype,
    ] + (["--tiny"] if args.tiny else [])
    env = dict(os.environ, KERAS_BACKEND=backend)
    # JAX then allocates on demand, so that the process holds what the
    # step needs rather than a preallocated fraction of the device.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    failed = {
        "method": method,
        "implementation": IMPLEMENTATIONS[method],
        "backend": backend,
    }
    try:
        process = subprocess.run(
            command,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            timeout=args.row_timeout,
        )
    except subprocess.TimeoutExpired:
        return {**failed, "error": f"timed out after {args.row_timeout} s"}
    lines = [line for line in process.stdout.splitlines() if line[:1] == "{"]
    if process.returncode or not lines:
        return {**failed, "error": f"exit code {process.returncode}"}
    return json.loads(lines[-1])


def _gigabytes(row):
    if row.get("peak_memory_bytes") is None:
        return ""
    text = f"{row['peak_memory_bytes'] / 1e9:.2f}"
    return text if row["peak_memory_source"] == "device" else text + " (RSS)"


def _markdown_line(row, reference):
    if "error" in row:
        cells = [
            row["implementation"],
            row["backend"],
            "failed: " + row["error"],
        ]
        return "| " + " | ".join(cells + [""] * 4) + " |"
    ratio = ""
    if reference is not None:
        ratio = f"{row['step_time_s'] / reference:.2f}"
    cells = [
        row["implementation"],
        row["backend"],
        f"{row['step_time_s']:.4f}",
        ratio,
        _gigabytes(row),
        ", ".join(f"{t:.2f}" for t in row["warmup_step_times_s"]),
        f"{row['trainable_parameters']:,}",
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(rows, header):
    """The results table, under a header saying how it was measured."""
    references = {
        row["backend"]: row["step_time_s"]
        for row in rows
        if row["method"] == "keras_lora" and "error" not in row
    }
    devices = sorted({row["device"] for row in rows if "device" in row})
    settings = header["settings"]
    lines = [
        "# Accelerator benchmark (`benchmarks/accelerator.py`)",
        "",
        f"- Device: {', '.join(devices) or 'none (every row failed)'}",
        f"- Date: {header['date']} (UTC, start of the run)",
        f"- Command: `{header['command']}`",
        f"- Model: Llama3CausalLM, random weights, {settings['model']}",
        f"- Batch {settings['batch_size']}, sequence length "
        f"{settings['sequence_length']}, rank {header['rank']}, "
        f"{header['dtype']}, AdamW 1e-4; {settings['warmup_steps']} warm-up "
        f"and {settings['timed_steps']} timed steps",
        "",
        "Step: median of the timed steps. Ratio: to Keras LoRA's step on the "
        "same backend in this run. Peak memory: the device's (the process's "
        "resident memory, marked RSS, where the device reports none). First "
        "steps: the warm-up steps, compilation included. One process per "
        "row; `accelerator.jsonl` has every field.",
        "",
        "| implementation | backend | step (s) | ratio to Keras LoRA | "
        "peak memory (GB) | first steps (s) | trainable params |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        _markdown_line(row, references.get(row["backend"])) for row in rows
    ]
    return "\n".join(lines) + "\n"


def write_results(rows, output, header):
    """Writes `accelerator.jsonl` and `accelerator.md` into `output`."""
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "accelerator.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    with open(os.path.join(output, "accelerator.md"), "w") as f:
        f.write(markdown(rows, header))


def _output_folder(args):
    if args.output is not None:
        return args.output
    if args.tiny:
        return tempfile.mkdtemp(prefix="accelerator-tiny-")
    return RESULTS


def run(args):
    """Runs every row of `args` in its own process; returns the exit code."""
    peers = args.peers
    if peers:
        missing = missing_peer_packages()
        if missing:
            print(
                "accelerator.py: skipping the --peers rows: "
                f"{' and '.join(missing)} not installed "
                "(pip install peft transformers)",
                file=sys.stderr,
            )
            peers = False
    output = _output_folder(args)
    header = {
        "date": _now(),
        "command": shlex.join(
            ["python", "benchmarks/accelerator.py"] + args.argv
        ),
        "settings": TINY if args.tiny else FULL,
        "rank": args.rank,
        "dtype": args.dtype,
    }
    rows = []
    for backend, method in planned_rows(args.backends, args.methods, peers):
        row = _row_process(backend, method, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
        write_results(rows, output, header)
    print(f"accelerator.py: results in {output}", file=sys.stderr)
    return int(any("error" in row for row in rows))


def _names(text, choices, parser, what):
    names = [name for name in text.split(",") if name]
    for name in names:
        if name not in choices:
            parser.error(f"unknown {what} {name!r}; choose from {choices}")
    return names


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backends",
        default="jax,torch",
        help="comma-separated, from jax, torch; run in this order",
    )
    parser.add_argument(
        "--methods",
        default=",".join(KERAS_ROWS),
        help=f"comma-separated Keras rows, from {KERAS_ROWS}",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="add PEFT LoRA and DoRA on transformers' Llama (torch)",
    )
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument(
        "--output",
        help="folder for accelerator.md and .jsonl; default "
        "benchmarks/results, or a new temporary folder with --tiny",
    )
    parser.add_argument(
        "--row-timeout",
        type=float,
        default=300,
        help="seconds a row may take before it is recorded as failed",
    )
    # A child process's single row, printed as JSON.
    parser.add_argument(
        "--row", choices=KERAS_ROWS + PEER_ROWS, help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    args.argv = argv
    args.backends = _names(args.backends, ("jax", "torch"), parser, "backend")
    args.methods = _names(args.methods, KERAS_ROWS, parser, "method")
    if args.row is None:
        return run(args)
    settings = TINY if args.tiny else FULL
    row = run_row(args.backends[0], args.row, settings, args.rank, args.dtype)
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
