#!/usr/bin/env bash
# Quickstart: learn colour/shape/position questions from pixels on 2 CPU ranks, no downloads.
#
#   bash examples/quickstart.sh            # writes ./quickstart_out/, prints heldout_accuracy=...
#
# Steps: synthetic images + captions + Q/A and a BPE tokenizer (make_data.py) -> indexed
# datasets (eve_megatron.tools.preprocess_data) -> stage 0 (patch embedding) -> copy step
# (vision copies = text weights) -> stage 1 (patch embedding + vision copies) -> stage 2
# (everything) -> greedy answers to held-out questions. Each stage runs under torchrun with 2 ranks.
# Environment: QUICKSTART_DIR (output folder), QUICKSTART_PARALLEL (layout flags, default
# "--tensor-model-parallel-size 2"), QUICKSTART_NPROC (default 2).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
QS="$HERE/quickstart"
OUT="${QUICKSTART_DIR:-$PWD/quickstart_out}"
NPROC="${QUICKSTART_NPROC:-2}"
PARALLEL="${QUICKSTART_PARALLEL:---tensor-model-parallel-size 2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
cd "$ROOT"
rm -rf "$OUT" && mkdir -p "$OUT"
start=$SECONDS
step() { echo "== [$((SECONDS - start))s] $*"; }

step "1/7 synthetic data and tokenizer"
python "$QS/make_data.py" --out "$OUT/raw" ${QUICKSTART_DATA_ARGS:-}

step "2/7 preprocessing"
PRE=(python -m eve_megatron.tools.preprocess_data --image-root "$OUT/raw" --tokenizer "$OUT/raw/tokenizer"
     --max-image-size 800 --seq-length 256 --workers 2 --no-progress
     --system-prompt "Answer.")
"${PRE[@]}" --input "$OUT/raw/captions.jsonl" --template plain --output-prefix "$OUT/data/captions"
"${PRE[@]}" --input "$OUT/raw/qa_train.json" --template qwen2 --output-prefix "$OUT/data/qa"
"${PRE[@]}" --input "$OUT/raw/qa_heldout.json" --template qwen2 --output-prefix "$OUT/data/heldout"

TRAIN=(torchrun --standalone --nproc-per-node "$NPROC"
       -m eve_megatron.pretrain $PARALLEL --tokenizer-model "$OUT/raw/tokenizer" ${QUICKSTART_TRAIN_ARGS:-})

step "3/7 stage 0: patch embedding only"
"${TRAIN[@]}" --config "$QS/stage0.yaml" --data-path "$OUT/data/captions" --save "$OUT/ckpt/stage0"

step "4/7 copy step: vision copies = text weights"
python -m eve_megatron.tools.copy_vision_branch --load "$OUT/ckpt/stage0" \
    --save "$OUT/ckpt/stage0_copied"

step "5/7 stage 1: patch embedding + vision copies"
"${TRAIN[@]}" --config "$QS/stage1.yaml" --data-path "$OUT/data/captions" \
    --load "$OUT/ckpt/stage0_copied" --save "$OUT/ckpt/stage1"

step "6/7 stage 2: everything, Q/A + captions"
"${TRAIN[@]}" --config "$QS/stage2.yaml" --data-path 0.4 "$OUT/data/qa" 0.6 "$OUT/data/captions" \
    --load "$OUT/ckpt/stage1" --finetune --save "$OUT/ckpt/stage2"

step "7/7 held-out questions"
python "$QS/evaluate.py" --load "$OUT/ckpt/stage2" --data "$OUT/data/heldout" \
    --tokenizer "$OUT/raw/tokenizer" ${QUICKSTART_EVAL_ARGS:-}
echo "quickstart_seconds=$((SECONDS - start))"
