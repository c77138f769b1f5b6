#!/usr/bin/env bash
# The Multi30k study of docs/results.md: the external anchor (plain fairseq, no plugin) and the
# plugin's recipe family, several training seeds each, then BLEU on test_2016_flickr, the report
# (docs/study.json, the tables of docs/results.md, seed-aware significance, convergence plots with
# seed bands) and the SMoE-Dropout BLEU-vs-k curve.
#
#   DATA=data-bin/multi30k OUT=study bash scripts/run_study.sh
#
# Budget: a fixed number of updates per run (the configs' --max-update, 1,000), not a fixed
# wall-clock: the host's speed changes between days and with load, so a wall-clock budget would
# give a config more or fewer updates depending on when it ran.  Wall-clock enters through the
# side-by-side throughput benchmark (scripts/study_throughput.py, step 1): every config is timed
# in interleaved rounds on an otherwise idle machine, and the report states BLEU at equal updates
# and at equal wall-clock time (a slower config is read at the interval checkpoint it reaches in
# the anchor's time).  Because quality does not depend on timing, runs may share the machine:
# PARALLEL runs train at once, each with nproc/PARALLEL threads (2 single-thread runs on 2 cores
# do 29% more work than one 2-thread run).
#
# Rotation: seed 1 of every config, then seed 2, ... (RUNS x SEEDS), so work that stops early
# leaves complete seeds.  Every finished step is skipped on a rerun: a run is trained when
# SAVE/.trained exists (an interrupted run resumes from its checkpoint_last.pt), evaluated when
# SAVE/eval/results.json exists; each run's record is SAVE/record.json.
#
# ARCHIVE (e.g. docs/study_runs): each run, once it has all its readings, is also copied there
# without its checkpoints (`study_report.py archive`, 0.1 to 0.2 MB a run), to be committed as it
# lands; a run archived there is done even when OUT is gone (a new machine), and the report is
# made from ARCHIVE, which then holds every run (and SMoE-Dropout's k curve, step 4).
#
# Environment: DATA, OUT, RUNS, SEEDS (default "1 2 3"), PARALLEL (2), THREADS (nproc / PARALLEL), BEAM (5),
# SKIP_THROUGHPUT=1 (no speed benchmark), STUDY_JSON (default $OUT/study.json; docs/study.json for
# the committed study), RESULTS_MD (a Markdown file whose generated section the report rewrites),
# README_MD (a README whose study summary section the report rewrites), AVERAGE (5: every run is
# also read with its last AVERAGE interval checkpoints averaged, as MT practice decodes; 0 skips it),
# ARCHIVE (above).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
# the project's environment (scripts/setup_env.sh), unless fairseq is already on PATH
if ! command -v fairseq-train > /dev/null && [ -f "${VENV:-.venv}/bin/activate" ]; then . "${VENV:-.venv}/bin/activate"; fi
DATA=${DATA:-data-bin/multi30k}
OUT=${OUT:-study}
# `dense` (the anchor's model inside the plugin) is not in the default runs: with the same seed it
# reproduces fairseq_dense bit for bit (docs/results.md), so it would spend a run per seed on a
# copy of the anchor.  RUNS="dense fairseq_dense" SEEDS=1 repeats that check.  Nor is
# `moe_top2_gate_local`: in one process every expert is local, so its dropped steps are routed
# steps and it reproduces moe_top2 bit for bit; it differs with expert parallelism
# (scripts/run_emulated_study.sh runs it).
RUNS=${RUNS:-"fairseq_dense moe_top2 moe_top2_gate_drop moe_top2_gate_expert_drop smoe_dropout"}
SEEDS=${SEEDS:-"1 2 3"}
PARALLEL=${PARALLEL:-2}
BEAM=${BEAM:-5}
STUDY_JSON=${STUDY_JSON:-$OUT/study.json}
ANCHOR=fairseq_dense
THREADS=${THREADS:-$(( $(nproc) / PARALLEL ))}; [ "$THREADS" -ge 1 ] || THREADS=1
AVERAGE=${AVERAGE:-5}
[[ "$AVERAGE" =~ ^[0-9]+$ ]] && [ "$AVERAGE" != 1 ] || { echo "run_study: AVERAGE must be 0 (no averaging) or a number of checkpoints >= 2 (got '$AVERAGE')" >&2; exit 2; }
[ -f "$DATA/train.en-de.en.idx" ] || { echo "run_study: no Multi30k data-bin at $DATA (bash data_prep/prepare_multi30k.sh --destdir $DATA)" >&2; exit 2; }
for run in $RUNS; do
  [ -f "configs/multi30k/$run.args" ] || { echo "run_study: RUNS: no config configs/multi30k/$run.args" >&2; exit 2; }
done
command -v fairseq-train > /dev/null || { echo "run_study: fairseq-train not found (bash scripts/setup_env.sh)" >&2; exit 2; }
mkdir -p "$OUT"
. scripts/study_lib.sh  # study_train, study_evaluate: the same commands as scripts/screen_recipe.sh

# 1. throughput side by side (nothing else may run meanwhile: it is the only timed step)
if [ -z "${SKIP_THROUGHPUT:-}" ] && [ ! -f "$OUT/throughput.json" ]; then
  echo "== throughput: every config timed in interleaved rounds ($(date +%T))"
  python scripts/study_throughput.py --data "$DATA" --configs "$(echo $RUNS | tr ' ' ,)" \
    --anchor "$ANCHOR" --out "$OUT/throughput.json"
fi

# 2. training and BLEU, rotated by seed, PARALLEL runs at a time
train_and_evaluate() {  # CONFIG SEED
  local run=$1 seed=$2 save=$OUT/$1/seed$2
  study_train "$save" "$run" "$PARALLEL" --seed "$seed"
  study_evaluate "$save"
  python scripts/study_report.py record "$save" --config "$run" --seed "$seed" > /dev/null
  # its other readings now, in its own slot, so each run lands complete (steps 3 and 3b below
  # then only catch runs recorded before a throughput measurement or with another AVERAGE)
  if [ -f "$OUT/throughput.json" ]; then
    python scripts/study_report.py equal-time "$OUT" --run "$run/seed$seed" --data "$DATA" --beam "$BEAM" --threads "$THREADS"
  fi
  if [ "$AVERAGE" -ge 2 ]; then
    python scripts/study_report.py average "$OUT" --run "$run/seed$seed" --data "$DATA" --last "$AVERAGE" \
      --beam "$BEAM" --threads "$THREADS"
  fi
  if [ -n "${ARCHIVE:-}" ]; then
    python scripts/study_report.py archive "$OUT" --run "$run/seed$seed" --raw-dir "$DATA/raw" --to "$ARCHIVE"
  fi
}

failed=0
for seed in $SEEDS; do
  for run in $RUNS; do
    if [ -f "$OUT/$run/seed$seed/record.json" ] || [ -f "${ARCHIVE:-$OUT}/$run/seed$seed/record.json" ]; then
      echo "== $run seed $seed: done, skipping"; continue
    fi
    while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n || failed=1; done
    echo "== $run seed $seed: training and BLEU ($(date +%T))"
    train_and_evaluate "$run" "$seed" &
  done
done
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || failed=1; done
[ "$failed" = 0 ] || { echo "run_study: a run failed (see its SAVE/train.log and SAVE/eval.log)" >&2; exit 1; }

# 3. BLEU at equal wall-clock for configs slower than the anchor (their equal-time checkpoint)
if [ -f "$OUT/throughput.json" ]; then
  python scripts/study_report.py equal-time "$OUT" --data "$DATA" --beam "$BEAM" --threads "$(nproc)"
fi

# 3b. every run read again with its last AVERAGE interval checkpoints averaged (final and equal-time update)
if [ "$AVERAGE" -ge 2 ]; then
  python scripts/study_report.py average "$OUT" --data "$DATA" --last "$AVERAGE" --beam "$BEAM" --threads "$(nproc)"
fi

# steps 3 and 3b may have added readings to runs in OUT: archive them again
if [ -n "${ARCHIVE:-}" ]; then
  python scripts/study_report.py archive "$OUT" --raw-dir "$DATA/raw" --to "$ARCHIVE"
fi

# 4. SMoE-Dropout's BLEU against the evaluation k (seed 1). It needs that run's checkpoint, so it
# is made on the machine that trained it; with ARCHIVE its tables are kept in ARCHIVE/smoe_slimmable,
# which then counts as done.
first_seed=${SEEDS%% *}
smoe_last=$OUT/smoe_dropout/seed$first_seed/checkpoint_last.pt
slim=$OUT/smoe_slimmable
if [[ " $RUNS " == *" smoe_dropout "* ]] && [ ! -f "$slim/slimmable.json" ] \
   && [ ! -f "${ARCHIVE:-$OUT}/smoe_slimmable/slimmable.json" ] && [ -f "$smoe_last" ]; then
  python scripts/slimmable_eval.py "$smoe_last" --data "$DATA" \
    --raw-dir "$DATA/raw" --out "$slim" --beam "$BEAM" --batch-size 100 --cpu
fi
if [ -n "${ARCHIVE:-}" ] && [ -f "$slim/slimmable.json" ]; then
  mkdir -p "$ARCHIVE/smoe_slimmable"
  for f in slimmable.json slimmable.md slimmable_bleu.png; do  # copy, then rename: never half a file
    if [ -f "$slim/$f" ]; then cp "$slim/$f" "$ARCHIVE/smoe_slimmable/.$f.tmp" && mv "$ARCHIVE/smoe_slimmable/.$f.tmp" "$ARCHIVE/smoe_slimmable/$f"; fi
  done
fi

# 5. the report: study.json, tables, significance over seeds and test sentences, plots
# (the PNGs go beside RESULTS_MD, which links them by name)
python scripts/study_report.py report "${ARCHIVE:-$OUT}" --anchor "$ANCHOR" --raw-dir "$DATA/raw" --json "$STUDY_JSON" \
  --beam "$BEAM" ${RESULTS_MD:+--results-md "$RESULTS_MD" --figures "$(dirname "$RESULTS_MD")"} \
  ${README_MD:+--readme "$README_MD"}
