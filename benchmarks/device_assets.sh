#!/usr/bin/env bash
# Makes, here, what a lent GPU needs to run the GLUE studies, in one folder
# that a device call carries (default .device, which git ignores):
#   whl/          keras, keras-hub, namex and optree wheels for the GPU
#                 image's Python 3.12 (it has JAX but neither Keras package)
#   minilm-fp16/  the default model with its weights rounded to float16
#                 (`float16_preset.py`: a call carries at most 64 MiB)
#   tokens/       the tasks tokenized by `glue.py --prepare`
# Usage:
#   bash benchmarks/device_assets.sh [FOLDER] [glue.py options]
# with the options the study will run with, so that the tokens match (e.g.
# `--study small-data --sequence-length stsb=64`). Needs the package
# registry and the data (`DATA_DIR`, default ../shared/data). Then, on the
# GPU, `benchmarks/run_glue_device.sh` runs the study from that folder.
set -euo pipefail
cd "$(dirname "$0")/.."
folder=${1:-.device}
shift $(($# > 0 ? 1 : 0))
data=${DATA_DIR:-../shared/data}
export TF_CPP_MIN_LOG_LEVEL=3
mkdir -p "$folder/whl"
python -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$folder/whl" \
  keras==3.15.1 keras-hub==0.32.0 namex optree
if [ ! -d "$folder/minilm-fp16" ]; then
  python benchmarks/float16_preset.py "$folder/minilm-fp16"
fi
python benchmarks/glue.py --prepare --data-dir "$data" \
  --preset "$folder/minilm-fp16" --tokens "$folder/tokens" "$@"
du -sh "$folder"
