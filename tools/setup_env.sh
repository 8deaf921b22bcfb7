#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv and installs tri_megatron into it.
# Idempotent; used by examples/quickstart.sh, tests/run_tests.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TRI_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
PIP="$VENV/bin/pip --disable-pip-version-check -q"
# torch first (2.13.0 is the CPU build on our machines), then build tools, then the package itself
# without build isolation so its extensions compile against this torch.
$PIP install -U pip "setuptools>=70" wheel
$PIP install "torch==2.13.0" "pybind11>=2.12" numpy
$PIP install --no-build-isolation -e ".[test]"
"$VENV/bin/python" -c "import tri_megatron, megatron.core, torch; print('tri_megatron env ready: torch', torch.__version__, 'megatron-core', megatron.core.__version__)"
