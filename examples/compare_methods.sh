#!/usr/bin/env bash
# LoRA vs KerasHub's LoRA vs DoRA vs BiDoRA on one GLUE task, every other
# setting shared; one folder per method with model.keras, metrics.json and
# training.png. `keras-bidora demo` does the same on SST-2 in one process.
set -euo pipefail
task=${1:-mrpc}
out=${2:-runs/$task}
for method in lora keras-lora dora bidora; do
    keras-bidora train --task "$task" --method "$method" \
        --epochs 2 --lr 2e-3 --seed 0 --overwrite --out "$out/$method"
done
python - "$out" <<'PY'
import json, pathlib, sys
for run in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.json")):
    m = json.loads(run.read_text())
    print(f"{m['method']:<11} {m['dev']}  trainable "
          f"{m['parameters']['trainable']:,}  {m['wall_time_s']['train']:.0f}s")
PY
