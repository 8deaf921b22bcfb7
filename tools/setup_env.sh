#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment and installs tri_megatron into it, with every
# package pinned by a constraints file, so the same commit installs the same set next month.
# Idempotent; used by examples/quickstart.sh, tests/run_tests.sh and .ci/run.
#   TRI_VENV         the environment's folder (default .venv)
#   TRI_CONSTRAINTS  the lock it is installed with (default constraints.txt; .ci/constraints-ends.txt for
#                    the other end of the declared ranges)
#   TRI_EXTRA_PACKAGES  more packages to install from the lock (the ends need triton: megatron-core 0.19
#                    imports it without declaring it; NGC containers ship it)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TRI_VENV:-.venv}
LOCK=${TRI_CONSTRAINTS:-constraints.txt}
[ -f "$LOCK" ] || { echo "setup_env.sh: TRI_CONSTRAINTS=$LOCK: no such file" >&2; exit 2; }
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
PIP="$VENV/bin/pip --disable-pip-version-check -q"
# build tools first (pinned), then torch (the CPU build on our machines), then the package itself without
# build isolation so that its extensions compile against this torch.
$PIP install -c "$LOCK" pip setuptools wheel
$PIP install -c "$LOCK" torch pybind11 numpy
$PIP install -c "$LOCK" --no-build-isolation -e ".[test]" ${TRI_EXTRA_PACKAGES:-}
"$VENV/bin/python" - "$LOCK" <<'PY'
import sys, warnings
warnings.simplefilter("ignore")
from importlib.metadata import distributions
pins = {}
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, version = line.split("==")
        pins[name.lower().replace("_", "-")] = version
have = {d.metadata["Name"].lower().replace("_", "-"): d.version.split("+")[0] for d in distributions()}
off = [f"{n} {have[n]} (lock: {v})" for n, v in pins.items() if n in have and have[n] != v]
if off:
    sys.exit(f"setup_env.sh: the environment differs from {sys.argv[1]}: {', '.join(off)}; "
             f"remove the environment folder and run again")
import megatron.core, torch, transformers, tri_megatron  # noqa: E401
print(f"tri_megatron env ready ({sys.argv[1]}): torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
      f"transformers {transformers.__version__}")
PY
