#!/usr/bin/env bash
# BiDoRA vs Keras LoRA on one GPU: step time and peak memory, JAX then torch.
# Needs a CUDA build of jax (jax[cuda12]) and of torch; writes one JSON row
# per (backend, method) to benchmarks/results/accelerator.jsonl and stdout.
# Extra arguments go to accelerator.py, e.g. `--methods lora,darts`, or
# `--tiny` for a CPU smoke test. About 5 minutes on one H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL=3
# Let JAX allocate on demand, so that its peak memory is what the step needs
# rather than a preallocated fraction of the device.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
out=benchmarks/results/accelerator.jsonl
mkdir -p "$(dirname "$out")"
: > "$out"
python -c "import jax, torch, keras, keras_hub; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available(), '| keras', keras.__version__, '| keras_hub', keras_hub.__version__)" >&2
status=0
for backend in ${BACKENDS:-jax torch}; do
    python benchmarks/accelerator.py --backend "$backend" "$@" | tee -a "$out"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit $status
