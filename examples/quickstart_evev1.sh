#!/usr/bin/env bash
# EVEv1 quickstart on CPU: the tiny EVEv1 (Vicuna-style decoder, patch embedding layer, PAL with
# a tiny random CLIP teacher made on the spot) trained from pixels, no downloads.
#
#   bash examples/quickstart_evev1.sh     # writes ./quickstart_evev1_out/, prints both losses
#
# Steps: synthetic images + captions + Q/A and a sentencepiece tokenizer (make_data.py
# --sentencepiece) -> EVEv1 datasets (--model-family evev1: 28-pixel blocks + each image's
# 336-pixel teacher image) -> prealign (PEL, projector, PAL; LLM frozen) -> SFT (everything but
# the teacher) on Q/A + captions, each under torchrun with 2 ranks (TP=2 + sequence parallel).
# The last lines compare the token loss and the PAL loss at the start and end of each stage.
# Environment: QUICKSTART_DIR, QUICKSTART_NPROC (default 2), QUICKSTART_IMAGES (default 300),
# QUICKSTART_ITERS ("prealign sft" iterations, default "20 30").
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
OUT="${QUICKSTART_DIR:-$PWD/quickstart_evev1_out}"
NPROC="${QUICKSTART_NPROC:-2}"
read -r PREALIGN_ITERS SFT_ITERS <<< "${QUICKSTART_ITERS:-20 30}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
cd "$ROOT"
rm -rf "$OUT" && mkdir -p "$OUT"
start=$SECONDS
step() { echo "== [$((SECONDS - start))s] $*"; }

step "1/4 synthetic data and a sentencepiece tokenizer"
python "$HERE/quickstart/make_data.py" --out "$OUT/raw" --sentencepiece \
    --train-images "${QUICKSTART_IMAGES:-300}" --heldout-images 10

step "2/4 preprocessing (EVEv1: 28-pixel blocks, teacher images)"
PRE=(python -m eve_megatron.tools.preprocess_data --image-root "$OUT/raw"
     --tokenizer "$OUT/raw/tokenizer_sp" --model-family evev1 --evev1-ratio 2
     --seq-length 1024 --workers 2 --no-progress)
"${PRE[@]}" --input "$OUT/raw/captions.jsonl" --template plain_bos --output-prefix "$OUT/data/captions"
"${PRE[@]}" --input "$OUT/raw/qa_train.json" --template vicuna_v1 --output-prefix "$OUT/data/qa"

TRAIN=(torchrun --standalone --nproc-per-node "$NPROC" -m eve_megatron.pretrain
       --model-preset evev1-tiny --tensor-model-parallel-size 2 --sequence-parallel
       --attention-backend sdpa --seq-length 1024 --micro-batch-size 2 --global-batch-size 4
       --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 0 --num-workers 1
       --log-interval 1 --no-progress --tokenizer-model "$OUT/raw/tokenizer_sp")

step "3/4 prealign: PEL + projector + PAL (LLM frozen)"
"${TRAIN[@]}" --trainable vision --train-iters "$PREALIGN_ITERS" \
    --data-path "$OUT/data/captions" --save "$OUT/ckpt/prealign" | tee "$OUT/prealign.log"

step "4/4 SFT: everything but the teacher, Q/A + captions"
"${TRAIN[@]}" --trainable all --train-iters "$SFT_ITERS" \
    --data-path 0.5 "$OUT/data/qa" 0.5 "$OUT/data/captions" \
    --load "$OUT/ckpt/prealign" --finetune --save "$OUT/ckpt/sft" | tee "$OUT/sft.log"

for stage in prealign sft; do
    python - "$OUT/$stage.log" "$stage" <<'PY'
import re, sys
rows = [(float(a), float(b)) for a, b in re.findall(r"\| loss ([0-9.e+-]+) \| pal loss ([0-9.e+-]+) \|",
                                                   open(sys.argv[1]).read())]
(t0, p0), (t1, p1) = rows[0], rows[-1]
print(f"{sys.argv[2]}: token_loss {t0:.4f} -> {t1:.4f}  pal_loss {p0:.4f} -> {p1:.4f}  ({len(rows)} iterations)")
PY
done
echo "quickstart_evev1_seconds=$((SECONDS - start))"
