#!/bin/bash
# A Megatron-LM launch script, written the way one is written for Megatron-LM's pretrain_gpt.py
# (GPT_MODEL_ARGS / TRAINING_ARGS / ... arrays, torchrun), with pretrain_gpt.py replaced by pretrain_tri.py.
# At this tiny size it runs on CPU (2 processes, no GPU); on a GPU node raise the sizes and GPUS_PER_NODE.
#
#   bash examples/megatron_lm_style.sh [CHECKPOINT_PATH] [TENSORBOARD_LOGS_PATH] [TOKENIZER_MODEL] [DATA_PATH]
#
# Without arguments it makes the sample data (examples/data/prepare_sample.sh) and writes to runs/megatron_style.
# What each Megatron flag does here (accepted, checked against the Tri preset, ignored, refused):
# README "Coming from Megatron-LM" and tri_megatron/config/megatron_flags.py.

set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_DEVICE_MAX_CONNECTIONS=1

OUT=runs/megatron_style
CHECKPOINT_PATH=${1:-$OUT/ckpt}
TENSORBOARD_LOGS_PATH=${2:-$OUT/tb}
TOKENIZER_MODEL=${3:-$OUT/data/tokenizer}
DATA_PATH=${4:-$OUT/data/bin/en_text_document}
if [[ $# -lt 4 && ! -f "$OUT/data/bin/en_text_document.idx" ]]; then
  mkdir -p "$OUT"
  bash examples/data/prepare_sample.sh "$OUT/data" > "$OUT/prepare.log" 2>&1 || { cat "$OUT/prepare.log"; exit 1; }
fi

GPUS_PER_NODE=${GPUS_PER_NODE:-2}
NUM_NODES=1
MASTER_ADDR=localhost
MASTER_PORT=${MASTER_PORT:-6000}
NODE_RANK=0

DISTRIBUTED_ARGS=(
    --nproc_per_node $GPUS_PER_NODE
    --nnodes $NUM_NODES
    --master_addr $MASTER_ADDR
    --master_port $MASTER_PORT
)

GPT_MODEL_ARGS=(
    --use-mcore-models
    --num-layers 4
    --hidden-size 128
    --ffn-hidden-size 384
    --num-attention-heads 4
    --group-query-attention
    --num-query-groups 2
    --kv-channels 32
    --seq-length 128
    --max-position-embeddings 256
    --position-embedding-type rope
    --rotary-base 10000
    --normalization RMSNorm
    --swiglu
    --untie-embeddings-and-output-weights
    --disable-bias-linear
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --attention-backend auto
)

TRAINING_ARGS=(
    --micro-batch-size 2
    --global-batch-size 8
    --train-samples 240
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --init-method-std 0.02
    --clip-grad 1.0
    --lr 3.0e-3
    --lr-decay-style WSD
    --lr-wsd-decay-style linear
    --lr-wsd-decay-samples 80
    --min-lr 3.0e-4
    --lr-warmup-samples 40
    --lr-decay-samples 240
    --use-flash-attn
    --no-masked-softmax-fusion
)

MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 2
    --pipeline-model-parallel-size 1
    --distributed-backend nccl
)

DATA_ARGS=(
    --data-path $DATA_PATH
    --tokenizer-type HuggingFaceTokenizer
    --tokenizer-model $TOKENIZER_MODEL
    --make-vocab-size-divisible-by 64
    --split 949,50,1
    --num-workers 0
)

EVAL_AND_LOGGING_ARGS=(
    --log-interval 5
    --log-throughput
    --save-interval 30
    --eval-interval 15
    --eval-iters 2
    --save $CHECKPOINT_PATH
    --load $CHECKPOINT_PATH
    --ckpt-format torch_dist
    --tensorboard-dir $TENSORBOARD_LOGS_PATH
)

torchrun ${DISTRIBUTED_ARGS[@]} pretrain_tri.py \
    ${GPT_MODEL_ARGS[@]} \
    ${TRAINING_ARGS[@]} \
    ${MODEL_PARALLEL_ARGS[@]} \
    ${DATA_ARGS[@]} \
    ${EVAL_AND_LOGGING_ARGS[@]}
