#!/usr/bin/env bash
# Quickstart, CPU, no downloads: set up .venv; make a small multilingual corpus (en, ko, ja, code,
# math), train a byte-level BPE tokenizer on it, preprocess it into megatron .bin/.idx files; then
# pretrain the tiny Tri preset on 2 processes (TP=2, one MTP head) with a data mixture whose
# math+code share rises over training; export the result to Hugging Face format (tokenizer included)
# and sample from the export. Prints the loss going down and per-domain validation loss; writes a
# checkpoint to runs/quickstart/ckpt, the export to runs/quickstart/hf and TensorBoard logs to
# runs/quickstart/tb.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
OUT=${OUT:-runs/quickstart}
rm -rf "$OUT"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
bash examples/data/prepare_sample.sh "$OUT/data"
.venv/bin/python -m torch.distributed.run --nproc_per_node 2 --master_port "${MASTER_PORT:-29400}" pretrain_tri.py \
  --model tri-tiny --tensor-model-parallel-size 2 --mtp-num-layers 1 \
  --data-path "$OUT"/data/bin/{en,ko,ja,code,math}_text_document --tokenizer "$OUT/data/tokenizer" \
  --data-mixture-schedule examples/data/mixture_schedule.yaml --split 90,10,0 --data-cache-path "$OUT/cache" \
  --seq-length 128 --micro-batch-size 4 --global-batch-size 8 --train-iters 60 --eval-interval 30 --eval-iters 2 \
  --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 5 --lr-decay-style cosine \
  --save "$OUT/ckpt" --save-interval 30 --tensorboard-dir "$OUT/tb" --log-json "$OUT/log.jsonl" --log-interval 5
.venv/bin/python tools/convert_checkpoint.py --to-hf "$OUT/ckpt" "$OUT/hf"
.venv/bin/python tools/generate.py "$OUT/hf" --prompt "The library" --max-new-tokens 24
echo "Hugging Face export: $OUT/hf; checkpoint: $OUT/ckpt (iteration $(cat "$OUT/ckpt/latest_checkpointed_iteration.txt")), TensorBoard: $OUT/tb, per-iteration log: $OUT/log.jsonl"
