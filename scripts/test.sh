#!/usr/bin/env bash
# Installs what the tests need, then runs the whole suite once per backend.
# Fails if any backend fails or if a backend ran no test (pytest exit 5).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k dense`.
# The backends run TEST_JOBS at a time (default 2: much of a test run is
# single-threaded Python and XLA compilation, so two share two cores well);
# each backend's output, with its 15 slowest tests, is printed whole when it
# ends.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh || exit 1
ruff check keras_bidora tests examples benchmarks || exit 1
export TF_CPP_MIN_LOG_LEVEL=3
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

run_backend() {
    KERAS_BACKEND=$1 python -m pytest tests -q -p no:cacheprovider \
        --durations=15 "${@:2}" > "$logs/$1.log" 2>&1
    echo $? > "$logs/$1.rc"
}

report() {
    echo "=== KERAS_BACKEND=$1"
    cat "$logs/$1.log"
    code=$(cat "$logs/$1.rc")
    if [ "$code" -ne 0 ]; then
        echo "=== $1 FAILED (pytest exit $code)"
        status=1
    fi
}

status=0
running=()
# Reports the backends that have ended and keeps the others in `running`.
reap() {
    local name still=()
    for name in "${running[@]}"; do
        if [ -e "$logs/$name.rc" ]; then
            report "$name"
        else
            still+=("$name")
        fi
    done
    running=("${still[@]+"${still[@]}"}")
}
for backend in ${BACKENDS:-tensorflow jax torch}; do
    while [ "${#running[@]}" -ge "${TEST_JOBS:-2}" ]; do
        wait -n
        reap
    done
    run_backend "$backend" "$@" &
    running+=("$backend")
done
wait
reap
exit $status
