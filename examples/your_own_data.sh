#!/usr/bin/env bash
# Train on your own CSV/TSV/JSONL files, then evaluate and predict.
# Here: a tiny made-up sentiment file, used as both train and dev, so that
# the script runs anywhere in a few minutes on a CPU.
set -euo pipefail
work=$(mktemp -d)
cat > "$work/reviews.csv" <<'CSV'
review,rating
"A joy from start to finish.",positive
"Dull, slow and far too long.",negative
"Sharp writing and a great cast.",positive
"I wanted my two hours back.",negative
"Warm, funny and beautifully shot.",positive
"Flat characters and a lazy plot.",negative
CSV

# Pair tasks add --text-pair-column; regression uses --task regression.
keras-bidora train \
    --train "$work/reviews.csv" --dev "$work/reviews.csv" \
    --text-column review --label-column rating \
    --method bidora --epochs 3 --batch-size 2 --sequence-length 32 \
    --out "$work/run"

cat "$work/run/metrics.json" | head -20
keras-bidora evaluate --model "$work/run/model.keras" --dev "$work/reviews.csv"
keras-bidora predict --model "$work/run/model.keras" \
    "What a lovely film." "Tedious and forgettable."
