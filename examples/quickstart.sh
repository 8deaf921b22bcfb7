#!/usr/bin/env bash
# Quickstart: set up .venv, then pretrain the tiny Tri preset on CPU (2 processes, TP=2) for a few
# dozen iterations. Prints the loss going down; writes a checkpoint to runs/quickstart/ckpt and
# TensorBoard logs to runs/quickstart/tb.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
OUT=${OUT:-runs/quickstart}
rm -rf "$OUT"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
.venv/bin/python -m torch.distributed.run --nproc_per_node 2 --master_port "${MASTER_PORT:-29400}" pretrain_tri.py \
  --model tri-tiny --mock-data --tensor-model-parallel-size 2 --mtp-num-layers 1 \
  --seq-length 128 --micro-batch-size 4 --global-batch-size 8 --train-iters 40 \
  --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 4 --lr-decay-style cosine \
  --save "$OUT/ckpt" --save-interval 20 --tensorboard-dir "$OUT/tb" --log-json "$OUT/log.jsonl" --log-interval 4
echo "checkpoint: $OUT/ckpt ($(cat "$OUT/ckpt/latest_checkpointed_iteration.txt")), TensorBoard: $OUT/tb, per-iteration log: $OUT/log.jsonl"
