#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (CPU). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=ignore
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider --disable-warnings "$@"
