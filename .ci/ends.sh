#!/usr/bin/env bash
# The focused pass at the other end of the declared dependency ranges (setup.py): megatron-core 0.19 and
# the oldest transformers we declare, in .venv-ends from .ci/constraints-ends.txt (the whole suite runs
# on the lock, constraints.txt, which holds megatron-core 0.16.1 and the newest transformers we declare).
# Model parity at TP2 (with and without SP) / PP2 / VPP with MTP (fused and unfused loss, the fused loss under SP, and against the stock
# model inside megatron's schedule), resume, the megatron-core seams,
# the HF conversion round trip, exports ready to serve and cached generation, a Megatron-LM checkpoint's
# conversion, context parallelism. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# megatron-core 0.19's metadata asks for Python >= 3.12; its cp311 wheel works on our 3.11 machines.
PIP_IGNORE_REQUIRES_PYTHON=1 TRI_EXTRA_PACKAGES=triton TRI_VENV=.venv-ends \
  TRI_CONSTRAINTS=.ci/constraints-ends.txt bash tools/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=ignore
exec .venv-ends/bin/python -m pytest -q -p no:cacheprovider --disable-warnings -n "${TRI_TEST_WORKERS:-2}" --dist loadfile \
  tests/test_mcore_internals.py tests/test_fused_loss_schedule.py tests/test_fused_loss_sequence_parallel.py \
  tests/test_grad_accum_fusion.py \
  tests/test_hf_generate.py tests/test_convert.py tests/test_hf_serving.py tests/test_megatron_lm_checkpoint.py \
  "tests/test_device.py::test_context_parallel_rank_gets_its_two_sequence_chunks" \
  "tests/test_device.py::test_context_parallel_matches_single_process" \
  "tests/test_parity.py::test_fused_mtp_loss_matches_unfused_path" \
  "tests/test_parity.py::test_layout_matches_single_process[mtp-tp2]" \
  "tests/test_parity.py::test_layout_matches_single_process[mtp-tp2_sp]" \
  "tests/test_parity.py::test_layout_matches_single_process[mtp-pp2_vpp2]" \
  "tests/test_parity.py::test_layout_matches_single_process[mtp-tp2_pp2]" \
  tests/test_training.py -k "not bf16 and not learns" "$@"
