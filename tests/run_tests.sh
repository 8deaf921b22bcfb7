#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (CPU). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=ignore
# Two workers (pytest-xdist), each taking whole test files (a file's module fixtures stay in one process):
# most tests keep one core busy (one training process, OMP_NUM_THREADS=1). TRI_TEST_WORKERS=0: one process.
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider --disable-warnings \
  -n "${TRI_TEST_WORKERS:-2}" --dist loadfile "$@"
