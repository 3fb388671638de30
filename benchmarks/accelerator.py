"""Step time and peak device memory: BiDoRA vs Keras LoRA on one accelerator.

The model is a KerasHub `Llama3CausalLM` with random weights, shaped like
Llama 3.2 1B (vocabulary 128256, 16 layers, hidden 2048, 32 query heads,
8 key/value heads, intermediate 8192, tied embeddings: 1.24B parameters),
under the `bfloat16` dtype policy (weights, adapters and compute in
bfloat16). Both methods adapt the attention's query and value projections
with rank 8:

- `lora`: `backbone.enable_lora(rank)` and `keras.Model.fit`;
- `bidora`: `keras_bidora.BiDoRAModel` with `hypergradient="first_order"`
  (one extra forward+backward pass per step) and `"darts"` (three).

Each (backend, method) runs in its own process, since JAX's peak memory
counter cannot be reset. One JSON row per run goes to stdout: the median
step time over the timed steps (after the warm-up steps, which include
compilation), the peak device memory (`memory_stats()` on JAX,
`torch.cuda.max_memory_allocated()` on torch; `null` where the device does
not report it) and the settings.

Usage:

    python benchmarks/accelerator.py --backend jax
    python benchmarks/accelerator.py --backend torch --methods lora,darts
    python benchmarks/accelerator.py --backend jax --tiny   # CPU smoke test

`--tiny` swaps in a 2-layer model (hidden 32) and 2 timed steps, to check
on a CPU that the script runs.
"""

import argparse
import json
import os
import subprocess
import sys
import time

# The rows: Keras's own LoRA, then BiDoRA with each of these hypergradients
# (`keras_bidora.config.HYPERGRADIENTS`).
ROWS = ("lora", "first_order", "darts")

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


def _device(backend):
    if backend == "jax":
        import jax

        return jax.devices()[0].device_kind
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def _peak_memory(backend):
    if backend == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return None


class _StepTimer:
    """Times each train step, waiting for its result first."""

    def __init__(self):
        import keras

        class Timer(keras.callbacks.Callback):
            def on_train_batch_begin(inner, batch, logs=None):
                inner.start = time.perf_counter()

            def on_train_batch_end(inner, batch, logs=None):
                # Reading the loss waits for the asynchronous step to finish.
                float(keras.ops.convert_to_numpy(logs["loss"]))
                self.times.append(time.perf_counter() - inner.start)

        self.times = []
        self.callback = Timer()


def run_one(backend, method, settings, rank, dtype):
    """Trains `method` for a few steps; returns the JSON row."""
    import keras
    import keras_hub
    import numpy as np

    import keras_bidora

    keras.config.set_dtype_policy(dtype)
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Llama3Backbone(**settings["model"])
    causal_lm = keras_hub.models.Llama3CausalLM(
        backbone=backbone, preprocessor=None
    )
    num_parameters = backbone.count_params()

    batch_size = settings["batch_size"]
    length = settings["sequence_length"]
    steps = settings["warmup_steps"] + settings["timed_steps"]
    # BiDoRA holds out a fifth of the samples for the upper level; give both
    # methods `steps` lower batches.
    samples = batch_size * steps
    if method != "lora":
        samples = samples * 5 // 4
    rng = np.random.default_rng(0)
    tokens = rng.integers(
        0, settings["model"]["vocabulary_size"], (samples, length + 1)
    ).astype("int32")
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.ones((samples, length), "int32"),
    }
    y = tokens[:, 1:]

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.AdamW(1e-4)
    if method == "lora":
        backbone.enable_lora(rank)
        model = causal_lm
        model.compile(optimizer=optimizer, loss=loss)
    else:
        model = keras_bidora.BiDoRAModel(
            causal_lm, rank=rank, hypergradient=method, seed=0
        )
        model.compile(optimizer=optimizer, loss=loss)
    num_trainable = sum(
        int(np.prod(v.shape)) for v in model.trainable_variables
    )

    timer = _StepTimer()
    model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[timer.callback],
    )
    timed = timer.times[settings["warmup_steps"] :]
    return {
        "backend": backend,
        "method": method,
        "step_time_s": float(np.median(timed)),
        "step_times_s": [round(t, 4) for t in timer.times],
        "peak_memory_bytes": _peak_memory(backend),
        "parameters": num_parameters,
        "trainable_parameters": num_trainable,
        "rank": rank,
        "dtype": dtype,
        "batch_size": batch_size,
        "sequence_length": length,
        "device": _device(backend),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("jax", "torch"), default="jax")
    parser.add_argument(
        "--methods",
        default=",".join(ROWS),
        help=f"comma-separated, from {ROWS}",
    )
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    for method in methods:
        if method not in ROWS:
            parser.error(f"unknown method {method!r}; choose from {ROWS}")
    settings = TINY if args.tiny else FULL

    if len(methods) > 1 or os.environ.get("KERAS_BACKEND") != args.backend:
        # One process per run: the backend is fixed at import, and JAX's
        # peak memory counter cannot be reset.
        status = 0
        for method in methods:
            command = [
                sys.executable,
                os.path.abspath(__file__),
                "--backend",
                args.backend,
                "--methods",
                method,
                "--rank",
                str(args.rank),
                "--dtype",
                args.dtype,
            ] + (["--tiny"] if args.tiny else [])
            env = dict(os.environ, KERAS_BACKEND=args.backend)
            status = subprocess.run(command, env=env).returncode or status
        return status
    row = run_one(args.backend, methods[0], settings, args.rank, args.dtype)
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
