#!/usr/bin/env bash
# Installs what the tests need, then runs the whole suite once per backend.
# Fails if any backend fails or if a backend ran no test (pytest exit 5).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k dense`.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh || exit 1
ruff check keras_bidora tests examples benchmarks || exit 1
export TF_CPP_MIN_LOG_LEVEL=3
status=0
for backend in ${BACKENDS:-tensorflow jax torch}; do
    echo "=== KERAS_BACKEND=$backend"
    KERAS_BACKEND=$backend python -m pytest tests -q -p no:cacheprovider "$@"
    code=$?
    if [ "$code" -ne 0 ]; then
        echo "=== $backend FAILED (pytest exit $code)"
        status=1
    fi
done
exit $status
