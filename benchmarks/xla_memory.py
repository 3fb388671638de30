"""XLA's memory analysis of one compiled train step on JAX, nothing run.

Compiles the train step of each method on the accelerator benchmark's
Llama-shaped model (`accelerator.py`'s settings: Llama 3.2 1B's shape,
`bfloat16` policy, batch 8 x 512 tokens, query and value adapted at rank
8, AdamW) and prints, per method, XLA's sizes of the step's buffers:
`argument` (the state and the batch), `output` and `temp` (the step's
temporaries as XLA's buffer assignment packs them: the peak of what the
step allocates beyond its arguments). Nothing is executed, so a CPU can
analyse the full shape; set `XLA_FLAGS=--xla_dump_to=DIR` to get the
buffer assignment behind each number (`*train_step*buffer-assignment.txt`).

XLA:CPU is not XLA:GPU: on a CPU the bfloat16 logits are kept in float32
(2.1 GB a copy at this shape) and the schedule differs, so compare methods
on one device, not one device's numbers with another's.

Usage:

    python benchmarks/xla_memory.py                    # every method
    python benchmarks/xla_memory.py --methods first_order darts --layers 6
    python benchmarks/xla_memory.py --tiny             # a 2-layer smoke test

Each method runs in its own process; each prints one JSON line.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accelerator  # noqa: E402

METHODS = ("dora", *accelerator.BILEVEL_ROWS)
RANK = 8


def _settings(tiny, layers):
    settings = accelerator.TINY if tiny else accelerator.FULL
    model = dict(settings["model"])
    if layers is not None:
        model["num_layers"] = layers
    return {**settings, "model": model}


def _batches(model, method, settings):
    """The step's batch as fit would pass it, having built the model."""
    import keras
    import numpy as np

    from keras_bidora import _keras_compat
    from keras_bidora.training import inputs

    batch_size = settings["batch_size"]
    # Five batches: BiDoRA holds out a fifth of them for the upper level.
    x, y = accelerator.causal_lm_data(settings, 5 * batch_size)
    if method in accelerator.BILEVEL_ROWS:
        prepared = inputs.bilevel_data(
            model, x, y, None, None, batch_size, None, False
        )
        model._build_for_training(prepared.first_batch)
        return keras.tree.map_structure(np.asarray, prepared.data[0])
    batch = ({k: v[:batch_size] for k, v in x.items()}, y[:batch_size])
    _keras_compat.symbolic_build(model, batch)
    return batch


def analyse(method, settings):
    """Compiles `method`'s train step; returns XLA's sizes in bytes."""
    import jax

    model = accelerator.keras_model(method, settings, RANK, "bfloat16")
    batch = _batches(model, method, settings)
    state = tuple(
        [v.value for v in variables]
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
    )
    abstract = jax.tree_util.tree_map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), (state, batch)
    )
    start = time.perf_counter()
    # As Keras's JAX trainer compiles it: the state's buffers donated.
    compiled = jax.jit(model.train_step, donate_argnums=0)
    compiled = compiled.lower(*abstract).compile()
    analysis = compiled.memory_analysis()
    return {
        "method": method,
        "argument_bytes": analysis.argument_size_in_bytes,
        "output_bytes": analysis.output_size_in_bytes,
        "alias_bytes": analysis.alias_size_in_bytes,
        "temp_bytes": analysis.temp_size_in_bytes,
        "compile_s": round(time.perf_counter() - start, 1),
        **accelerator.parameter_counts(model),
        "layers": settings["model"]["num_layers"],
        "batch": [settings["batch_size"], settings["sequence_length"]],
        "device": str(jax.devices()[0].device_kind),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS)
    )
    parser.add_argument(
        "--layers",
        type=int,
        help="decoder layers (default: the settings', 16; --tiny: 2)",
    )
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = _settings(args.tiny, args.layers)
    if args.method:
        print(json.dumps(analyse(args.method, settings)), flush=True)
        return 0
    environment = dict(os.environ, KERAS_BACKEND="jax")
    status = 0
    for method in args.methods:
        command = [sys.executable, os.path.abspath(__file__), "--method"]
        command += [method] + (["--tiny"] if args.tiny else [])
        if args.layers is not None:
            command += ["--layers", str(args.layers)]
        status = subprocess.run(command, env=environment).returncode or status
    return status


if __name__ == "__main__":
    sys.exit(main())
