#!/usr/bin/env bash
# The main job, on a fresh machine: set up, generate the embedded corpus (English -> three
# invented languages, no download), train a small multilingual MoE transformer with Gating
# Dropout, generate every direction and print sacrebleu BLEU next to a copy-the-source baseline.
# About 10 minutes on 2 CPU cores.  OUT (default quickstart_out) holds everything it writes.
# QUICKSTART_FAST=1 runs the same commands on a small corpus for a few updates (CI: a check that
# every step works, not a result); SETUP=0 skips scripts/setup_env.sh (an existing VENV).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SETUP:-1}" != 0 ]; then
  bash scripts/setup_env.sh
fi
. "${VENV:-.venv}/bin/activate"
OUT=${OUT:-quickstart_out}
if [ "${QUICKSTART_FAST:-0}" = 1 ]; then
  UPDATES=${UPDATES:-3}
  CORPUS_SIZE=(--train 300 --valid 20 --test 20)
else
  UPDATES=${UPDATES:-600}
  CORPUS_SIZE=()
fi
PAIRS=en-xa,en-xb,en-xc
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

if [ ! -f "$OUT/data-bin/train.en-xc.xc.idx" ]; then
  echo "== 1/3 corpus: generate, sentencepiece, fairseq-preprocess"
  python -m data_prep.synthetic_corpus --out "$OUT/raw" --binarize "$OUT/data-bin" ${CORPUS_SIZE[@]+"${CORPUS_SIZE[@]}"}
fi

echo "== 2/3 fairseq-train: transformer_moe_tiny, 4 experts (top-2) in every 2nd FFN, Gate-Drop p=0.3"
# The full log goes to train.log; the filter shows progress.  pipefail makes fairseq-train's exit
# status the pipeline's (grep's "no line matched" is not a failure), so a failed training stops
# here even when OUT holds the checkpoints of an earlier run, and shows the end of the log (the
# error and its traceback, which the filter hid).
if ! fairseq-train "$OUT/data-bin" --user-dir moe_fairseq --task translation_multi_moe \
  --lang-pairs "$PAIRS" --encoder-langtok src --decoder-langtok \
  --arch transformer_moe_tiny --encoder-embed-dim 128 --encoder-ffn-embed-dim 256 \
  --encoder-attention-heads 4 --decoder-attention-heads 4 --share-all-embeddings \
  --moe-expert-count 4 --moe-router top2 --moe-gating-dropout 0.3 --moe-gating-dropout-mode gate_drop \
  --criterion moe_label_smoothed_cross_entropy --label-smoothing 0.1 \
  --optimizer adam --adam-betas '(0.9,0.98)' --lr 0.003 --lr-scheduler inverse_sqrt --warmup-updates 100 \
  --max-tokens 4096 --max-update "$UPDATES" --cpu --num-workers 0 --seed 1 \
  --save-dir "$OUT/checkpoints" --no-epoch-checkpoints --save-interval-updates 200 --keep-interval-updates 1 \
  --validate-interval-updates 200 --log-format simple --log-interval 50 --no-progress-bar 2>&1 \
  | tee "$OUT/train.log" | { grep --line-buffered -E "train_inner|valid on|done training|Error|error" || true; }; then
  echo "quickstart: fairseq-train failed; the end of $OUT/train.log:" >&2
  tail -n 40 "$OUT/train.log" >&2
  exit 1
fi

echo "== 3/3 fairseq-generate + sacrebleu (hypotheses aligned to references by sentence id)"
moe-evaluate "$OUT/data-bin" --path "$OUT/checkpoints/checkpoint_best.pt" --lang-pairs "$PAIRS" \
  --raw-dir "$OUT/raw" --split test --beam 4 --cpu --copy-baseline --out "$OUT/eval"
