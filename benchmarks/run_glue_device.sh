#!/usr/bin/env bash
# Runs a GLUE study on a lent GPU from the folder `device_assets.sh` made:
#   bash benchmarks/run_glue_device.sh FOLDER OUT SECONDS [glue.py options]
# It installs the carried wheels where keras_hub does not import, copies
# results/glue/runs.jsonl to OUT/glue unless a runs.jsonl is there already
# (so that neither the runs on record nor an earlier command's in the same
# call run again), and runs glue.py there on JAX with its persistent
# compilation cache, the float16 preset and the cached tokens, starting
# no run after SECONDS (give the call SECONDS plus the longest run's time
# and the start's: a run started before the limit finishes). Bring OUT/glue/runs.jsonl
# back over benchmarks/results/glue/runs.jsonl and run `glue.py --report`
# with the same options here to rewrite the tables.
#
# The data files stay here: `--data-dir` names a folder that does not
# exist, so that glue.py reads the tokens without checking them against
# data files (it checks where it finds them; the tokens' own records name
# the files they were made from).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 3 ]; then
  echo "usage: $0 FOLDER OUT SECONDS [glue.py options]; received: $*" >&2
  exit 2
fi
folder=$1 out=$2 seconds=$3
shift 3
start=$SECONDS
if ! python3 -c "import keras_hub" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site "$folder"/whl/*.whl || exit
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# keras_bidora from this working tree.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TF_CPP_MIN_LOG_LEVEL=3 XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p "$out/glue"
if [ ! -e "$out/glue/runs.jsonl" ]; then
  cp benchmarks/results/glue/runs.jsonl "$out/glue/runs.jsonl"
fi
python3 benchmarks/glue.py --backend jax \
  --jax-compilation-cache "${JAX_CACHE:-/tmp/jaxcache}" \
  --preset "$folder/minilm-fp16" --tokens "$folder/tokens" \
  --data-dir "$folder/no-data-files" --out "$out/glue" \
  --stop-after "$((seconds - (SECONDS - start)))" "$@"
status=$?
echo "run_glue_device.sh: total wall time $((SECONDS - start)) s" >&2
exit $status
