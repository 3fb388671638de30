#!/usr/bin/env bash
# The accelerator table in one run, on one GPU: Keras LoRA and keras-bidora's
# LoRA, DoRA and BiDoRA (first_order, darts) on JAX, then on torch, then
# PEFT's LoRA and DoRA on transformers' Llama (skipped, with a line on
# stderr, when peft or transformers is missing). One process per row.
# Writes benchmarks/results/accelerator.md and accelerator.jsonl (rewritten
# after every row, so that an interrupted run keeps its finished rows) and
# prints the JSON rows on stdout, then the total wall time on stderr.
# Needs keras, keras-hub and CUDA builds of jax and torch; not tensorflow.
# Extra arguments go to accelerator.py, e.g. `--backends torch`,
# `--methods keras_lora,darts`, or `--tiny --output DIR` on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL=3
# Let JAX allocate on demand, so that its peak memory is what the step needs
# rather than a preallocated fraction of the device.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
start=$SECONDS
python benchmarks/accelerator.py --peers "$@"
status=$?
echo "run_accelerator.sh: total wall time $((SECONDS - start)) s" >&2
exit $status
