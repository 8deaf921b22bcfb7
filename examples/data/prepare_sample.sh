#!/usr/bin/env bash
# Sample data for the quickstart, no downloads: a multilingual corpus (en, ko, ja, code, math) generated
# by examples/make_sample_corpus.py -> a byte-level BPE with 30% of its vocabulary for Korean + Japanese
# -> megatron-core .bin/.idx files, one per domain (OUT/bin/<domain>_text_document). Takes a few seconds.
#   bash examples/data/prepare_sample.sh [OUT=data/sample]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-data/sample}
PY=${PYTHON:-.venv/bin/python}
$PY examples/make_sample_corpus.py --output "$OUT/corpus"
$PY tools/train_tokenizer.py --input "$OUT"/corpus/*.jsonl --vocab-size 1536 \
  --quota ko=0.15,ja=0.15,rest=0.70 --output "$OUT/tokenizer"
$PY tools/preprocess_data.py --input "$OUT"/corpus/{en,ko,ja,code,math}.jsonl --output-per-input \
  --output-prefix "$OUT/bin/" --tokenizer "$OUT/tokenizer" --json-keys text --append-eod --workers 2
echo "data: --data-path $(printf "$OUT/bin/%s_text_document " en ko ja code math)--tokenizer $OUT/tokenizer"
