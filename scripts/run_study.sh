#!/usr/bin/env bash
# The Multi30k study of docs/results.md: en -> de, fr, cs, one run per committed config, every
# run with the same wall-clock budget, one after another (parallel runs would share the cores
# and distort the clock), then sacrebleu BLEU on test_2016_flickr, the convergence plots, the
# SMoE-Dropout BLEU-vs-k curve, the expert-usage plots and a paired bootstrap against top-2.
# Finished steps (a trained run, its BLEU, the k curve) are skipped on a rerun.
#
#   DATA=data-bin/multi30k OUT=study MINUTES=20 bash scripts/run_study.sh
#
# The configs are used as committed, minus the per-validation BLEU (--eval-bleu and the
# BLEU-based checkpoint selection: decoding the 3,042 validation sentences at every validation
# would eat a short budget), plus the budget: --stop-time-hours, a warmup and a validation
# interval scaled to it.  SMoE-Dropout's k schedule is set to reach k = E after SMOE_STEPS updates.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data-bin/multi30k}
OUT=${OUT:-study}
MINUTES=${MINUTES:-20}
RUNS=${RUNS:-"dense moe_top2 moe_top2_gate_drop moe_top2_gate_expert_drop smoe_dropout"}
WARMUP=${WARMUP:-300}
VALID_EVERY=${VALID_EVERY:-200}
SMOE_STEPS=${SMOE_STEPS:-900}
# interval checkpoints kept per run: scripts/plot_expert_usage.py reads them for usage over training
KEEP=${KEEP:-20}
BEAM=${BEAM:-4}
[ -f "$DATA/train.en-de.en.idx" ] || { echo "run_study: no Multi30k data-bin at $DATA (bash data_prep/prepare_multi30k.sh --destdir $DATA)" >&2; exit 2; }
HOURS=$(python -c "print($MINUTES / 60)")
mkdir -p "$OUT"
for run in $RUNS; do
  cfg=configs/multi30k/$run.args
  save=$OUT/$run
  if [ -f "$save/checkpoint_last.pt" ]; then
    echo "== $run: already trained ($save), skipping"
  else
    echo "== $run: training for $MINUTES minutes ($(date +%T))"
    extra=()
    [ "$run" = smoe_dropout ] && extra=(--moe-top-k-schedule-steps "$SMOE_STEPS")
    grep -v -E '^#|^--(eval-bleu|best-checkpoint-metric|maximize-best-checkpoint-metric)' "$cfg" > "$OUT/$run.args"
    FAIRSEQ_TRAIN=fairseq-train bash scripts/train.sh "$OUT/$run.args" "$DATA" "$save" \
      --cpu --num-workers 0 --stop-time-hours "$HOURS" --max-update 1000000 \
      --warmup-updates "$WARMUP" --validate-interval-updates "$VALID_EVERY" \
      --save-interval-updates "$VALID_EVERY" --keep-interval-updates "$KEEP" "${extra[@]}" > /dev/null
  fi
  if [ ! -f "$OUT/$run/eval/results.json" ]; then
    echo "== $run: BLEU on test_2016_flickr ($(date +%T))"
    moe-evaluate "$DATA" --path "$save/checkpoint_best.pt" --lang-pairs en-de,en-fr,en-cs \
      --raw-dir "$DATA/raw" --split test --beam "$BEAM" --batch-size 200 --cpu --out "$save/eval"
  fi
done
logs=(); labels=()
for run in $RUNS; do logs+=("$OUT/$run/train.log"); labels+=("$run"); done
python scripts/plot_convergence.py "${logs[@]}" --labels "$(IFS=,; echo "${labels[*]}")" --out "$OUT/convergence.png" \
  --title "Multi30k en->de,fr,cs, $MINUTES min per run on $(nproc) CPU cores"
python scripts/plot_convergence.py "${logs[@]}" --labels "$(IFS=,; echo "${labels[*]}")" --x updates \
  --out "$OUT/convergence_updates.png" --title "Multi30k en->de,fr,cs: validation loss per update"
if [[ " $RUNS " == *" smoe_dropout "* ]] && [ ! -f "$OUT/smoe_slimmable/slimmable.json" ]; then
  python scripts/slimmable_eval.py "$OUT/smoe_dropout/checkpoint_best.pt" --data "$DATA" --raw-dir "$DATA/raw" \
    --out "$OUT/smoe_slimmable" --beam "$BEAM" --batch-size 200 --cpu -- --max-len-a 1.2 --max-len-b 10
fi
# expert usage over training and per language, from the interval checkpoints; SMoE-Dropout at
# k = 1 (at k = E every token uses every expert, so its usage is uniform by construction)
for run in $RUNS; do
  [ "$run" = dense ] && continue
  k=(); [ "$run" = smoe_dropout ] && k=(--moe-eval-top-k 1)
  python scripts/plot_expert_usage.py "$OUT/$run" --data "$DATA" --out-dir "$OUT/usage/$run" --cpu "${k[@]}"
done
if [[ " $RUNS " == *" moe_top2 "* ]]; then
  # sacrebleu's paired bootstrap of every run against plain top-2 (test-set noise; one seed each)
  dirs=(); for run in $RUNS; do dirs+=("$OUT/$run/eval"); done
  python scripts/compare_runs.py "${dirs[@]}" --labels "$(IFS=,; echo "${labels[*]}")" --baseline moe_top2 \
    --raw-dir "$DATA/raw" --split test --out "$OUT/significance"
fi
python - "$OUT" $RUNS <<'PY'
import json, sys
out, runs = sys.argv[1], sys.argv[2:]
print("| run | en-de | en-fr | en-cs | mean |")
print("|---|---|---|---|---|")
for run in runs:
    rows = {r["direction"]: r["bleu"] for r in json.load(open(f"{out}/{run}/eval/results.json"))}
    vals = [rows[d] for d in ("en-de", "en-fr", "en-cs")]
    print(f"| {run} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {sum(vals) / 3:.2f} |")
print()
print("signature:", json.load(open(f"{out}/{runs[0]}/eval/results.json"))[0]["signature"])
PY
