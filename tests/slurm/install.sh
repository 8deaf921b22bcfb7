#!/usr/bin/env bash
# Install Debian's SLURM (slurm-wlm 22.05 on bookworm) and munge for tests/test_slurm.py. Needs root.
# Exits non-zero when the binaries are still missing afterwards; on CI the SLURM test then fails
# (it never skips there).
set -uo pipefail
have() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
         && command -v munged >/dev/null; }
export PATH="$PATH:/usr/sbin:/sbin"
if have; then echo "install.sh: slurm-wlm and munge already installed"; exit 0; fi
if [[ $(id -u) -ne 0 ]]; then echo "install.sh: needs root to apt-get install slurm-wlm munge" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
for attempt in 1 2 3; do
  if apt-get update && apt-get install -y slurm-wlm munge; then break; fi
  echo "install.sh: apt-get failed (attempt $attempt), retrying" >&2
  sleep $((attempt * 5))
done
if have; then echo "install.sh: installed $(slurmctld -V)"; exit 0; fi
echo "install.sh: slurm-wlm/munge are still missing after apt-get install" >&2
exit 1
