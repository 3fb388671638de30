#!/usr/bin/env bash
# Installs keras-bidora and runs the main job: LoRA vs DoRA vs BiDoRA on a
# small real task with the offline pretrained MiniLM-L6 BERT.
# Extra arguments go to `keras-bidora demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export TF_CPP_MIN_LOG_LEVEL=3
# `python -m` rather than the console script: a new script may not be on
# PATH until the shell (or pyenv) rehashes.
python -m keras_bidora demo "$@"
