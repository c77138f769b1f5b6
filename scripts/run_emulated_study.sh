#!/usr/bin/env bash
# The Multi30k study on the emulated two-node cluster (docs/emulated_network.md): every run
# trains expert-parallel over 2 emulated nodes (one rank each, gloo over the emulated link), then
# is evaluated, read at equal wall-clock on each link of READ_RATES, recorded and archived with the
# Multi30k study's machinery (scripts/study_lib.sh's study_evaluate, scripts/study_report.py
# record / equal-time / archive / report), so `study_report.py report` reads the result like
# docs/study_runs.
#
#   sudo DATA=data-bin/multi30k OUT=emulated_study ARCHIVE=docs/emulated_study_runs \
#        bash scripts/run_emulated_study.sh
#
# Budget: a fixed number of updates per run (MAX_UPDATE, default 500), as in scripts/run_study.sh,
# not a fixed wall-clock: the host's speed changes with load, so a wall-clock budget would give a
# config more or fewer updates depending on what else ran.  What a run computes does not depend on
# the link either (the link only sets how long each step takes), so every run trains on the
# unshaped link (TRAIN_RATE_MBIT, default 0), and wall-clock enters through the side-by-side
# speed of every config on each link of READ_RATES (default "250 0": an all-to-all share of about
# 45% and the unshaped link; step 1, scripts/study_throughput.py --emulated-rate-mbit, interleaved
# rounds): each run is read at the interval checkpoint it reaches in the anchor's time.  The
# speed files, OUT/throughput_link<R>mbit.json, are measured once and kept with the archive
# (ARCHIVE/link<R>mbit/throughput.json): runs trained later are read with the same speeds, which
# describe the emulated cluster the study defines.
#
# Batch: MAX_TOKENS per rank (default 2048), so the 2 ranks' batch is the single-process study's
# 4,096 tokens; the configs' optimisation and checkpoint interval (50 updates) are kept.
#
# RUNS: space-separated NAME=CONFIG[:FLAG,VALUE,...] (CONFIG from configs/multi30k; the flags go
# after the config's and win).  Default: top-2, Gate-Drop at p = 0.1, 0.3, 0.5,
# Gate-Expert-Drop at 0.3, Gate-Drop restricted to the local experts' top-k (local_topk) at 0.3,
# and fairseq's dense transformer data-parallel as the anchor (fairseq's task, model and
# criterion; the plugin only fixes fairseq's CPU data parallelism).  SEEDS (default "1 2"):
# rotated seed-major (seed 1 of every run, then seed 2, ...), so work that stops early leaves
# complete seeds; narrow RUNS for the runs that need more seeds.
#
# AVERAGE (default 3): every reading is also made with the last AVERAGE interval checkpoints
# averaged (moe-average consolidates the expert shards), as MT practice decodes.  3 of 50 updates
# is the Multi30k study's 5 scaled to 500 updates, and it fits the earliest equal wall-clock
# reading (update 200 at 250 Mbit/s); 0 skips it.
#
# BUDGET_OF (optional, a run name of RUNS): every run but the anchor is read a second time at
# that run's budget, its MAX_UPDATE updates, on each link (study_report.py rebase: the same speed
# measurement with that run as the anchor).  The anchor's budget reads the MoE runs early, where
# single checkpoints swing; this reading compares the MoE variants where BLEU means something.
# Plain fairseq is left out of it: it would be capped at its final update.  A run faster than
# BUDGET_OF is capped at its final update too (conservative against it; the speed table says so).
# Each run is mirrored into OUT/budget_<BUDGET_OF>/link<R>mbit (its record, flags and
# evaluations copied, its checkpoints linked), so the anchor's readings are not touched, and
# archived to ARCHIVE/budget_<BUDGET_OF>/link<R>mbit.
#
# CONTINUE_TO (optional, a multiple of 50 above MAX_UPDATE): after the readings, every run of RUNS
# is continued from its last checkpoint, with the same flags, to CONTINUE_TO updates in
# OUT/continued_to<N>/NAME/seedS, for its validation curve alone (no BLEU): a run that learns less
# per update than the baseline does not reach the baseline's final loss within the budget, and
# this measures when it does (study_report.py report --continued).  fairseq's resume is exact (the
# data order, the seeds per update and the inverse-sqrt schedule do not depend on --max-update),
# so the curve is the one a longer run would have.  Its record is archived to
# ARCHIVE/continued_to<N>/NAME/seedS; the run's own readings are untouched.
#
# Resumable: a run with ARCHIVE/link<R>mbit/.../record.json for every R (and each reading asked
# for) is done; a trained run (SAVE/.trained) is only evaluated and read; a run interrupted in
# training resumes from its checkpoint; the speed measurement keeps its rounds as they land.
#
# Environment: DATA, OUT, ARCHIVE (optional), MAX_UPDATE, MAX_TOKENS, TRAIN_RATE_MBIT, READ_RATES,
# RUNS, SEEDS, AVERAGE (3), BUDGET_OF, CONTINUE_TO, BEAM (5), EVAL_THREADS (2), THROUGHPUT_ROUNDS (2),
# THROUGHPUT_RUNS (default RUNS), EXTRA (more fairseq-train flags for every run, e.g. for a smoke
# test), MASTER_PORT (29500, inside the namespaces), COLLECTIVE_TIMEOUT (600 s, as
# train_torchrun.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
if ! command -v fairseq-train > /dev/null && [ -f "${VENV:-.venv}/bin/activate" ]; then . "${VENV:-.venv}/bin/activate"; fi
DATA=${DATA:-data-bin/multi30k}
OUT=${OUT:-emulated_study}
TRAIN_RATE_MBIT=${TRAIN_RATE_MBIT:-0}
READ_RATES=${READ_RATES:-"250 0"}
MAX_UPDATE=${MAX_UPDATE:-500}
MAX_TOKENS=${MAX_TOKENS:-2048}
SEEDS=${SEEDS:-"1 2"}
BEAM=${BEAM:-5}
EVAL_THREADS=${EVAL_THREADS:-2}
THROUGHPUT_ROUNDS=${THROUGHPUT_ROUNDS:-2}
AVERAGE=${AVERAGE:-3}
BUDGET_OF=${BUDGET_OF:-}
CONTINUE_TO=${CONTINUE_TO:-}
ANCHOR=fairseq_dense
RUNS=${RUNS:-"moe_top2=moe_top2
  gate_drop_p0.3=moe_top2_gate_drop:--moe-gating-dropout,0.3
  fairseq_dense=fairseq_dense
  gate_drop_p0.1=moe_top2_gate_drop:--moe-gating-dropout,0.1
  gate_drop_p0.5=moe_top2_gate_drop:--moe-gating-dropout,0.5
  gate_expert_drop_p0.3=moe_top2_gate_expert_drop:--moe-gating-dropout,0.3
  gate_local_p0.3=moe_top2_gate_local"}
THROUGHPUT_RUNS=${THROUGHPUT_RUNS:-$RUNS}

die() { echo "run_emulated_study: $*" >&2; exit 2; }
for r in $TRAIN_RATE_MBIT $READ_RATES; do
  [[ "$r" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "TRAIN_RATE_MBIT and READ_RATES must be rates in Mbit/s, 0 for unshaped (got '$r')"
done
[[ "$MAX_UPDATE" =~ ^[1-9][0-9]*$ ]] && [ $((MAX_UPDATE % 50)) = 0 ] || die "MAX_UPDATE must be a positive multiple of 50, the checkpoint interval (got '$MAX_UPDATE')"
[ -z "$CONTINUE_TO" ] || { [[ "$CONTINUE_TO" =~ ^[1-9][0-9]*$ ]] && [ $((CONTINUE_TO % 50)) = 0 ] && [ "$CONTINUE_TO" -gt "$MAX_UPDATE" ]; } \
  || die "CONTINUE_TO must be a multiple of 50 above MAX_UPDATE=$MAX_UPDATE (got '$CONTINUE_TO')"
[[ "$MAX_TOKENS" =~ ^[1-9][0-9]*$ ]] || die "MAX_TOKENS must be a positive number of tokens per rank (got '$MAX_TOKENS')"
[[ "$AVERAGE" =~ ^[0-9]+$ ]] && [ "$AVERAGE" != 1 ] || die "AVERAGE must be a number of checkpoints >= 2, or 0 for no averaged reading (got '$AVERAGE')"
[[ "$THROUGHPUT_ROUNDS" =~ ^[0-9]+$ ]] || die "THROUGHPUT_ROUNDS must be a number of rounds, 0 to skip the speed measurement (got '$THROUGHPUT_ROUNDS')"
[ -f "$DATA/dict.txt" ] || die "no fairseq data-bin at DATA=$DATA (bash data_prep/prepare_multi30k.sh --destdir $DATA)"
command -v fairseq-train > /dev/null || die "fairseq-train not found (bash scripts/setup_env.sh)"
# run from the repository root (as the paths above are): python -c finds moe_fairseq there
missing=$(python -c "from moe_fairseq.experiments.emulated_cluster import missing_requirements as m; print(m() or '')")
[ -z "$missing" ] || die "$missing"
for spec in $RUNS $THROUGHPUT_RUNS; do
  config=${spec#*=}; config=${config%%:*}
  [[ "$spec" == *=* ]] || die "RUNS: '$spec' is not NAME=CONFIG[:FLAG,VALUE,...]"
  [ -f "configs/multi30k/$config.args" ] || die "RUNS: no config configs/multi30k/$config.args (in '$spec')"
done
parse_spec() {  # SPEC: name, config and flags of NAME=CONFIG[:FLAG,VALUE,...]
  local rest=${1#*=}
  name=${1%%=*} config=${rest%%:*} flags=()
  if [[ "$rest" == *:* ]]; then IFS=, read -r -a flags <<< "${rest#*:}"; fi
}
if [ -n "$CONTINUE_TO" ]; then
  # a continuation is the longer run only if the LR schedule does not read --max-update
  for spec in $RUNS; do
    parse_spec "$spec"; sched=fixed  # fairseq's default
    set -f; toks=($(grep -v '^#' "configs/multi30k/$config.args") "${flags[@]}"); set +f
    for i in "${!toks[@]}"; do [ "${toks[$i]}" != --lr-scheduler ] || sched=${toks[$((i + 1))]}; done
    case $sched in inverse_sqrt|fixed) ;; *) die "CONTINUE_TO: $name's --lr-scheduler $sched depends on --max-update, so its continuation would not be the longer run (inverse_sqrt or fixed only)";; esac
  done
fi
if [ -n "$BUDGET_OF" ]; then
  timed=" $(for spec in $THROUGHPUT_RUNS; do printf '%s ' "${spec%%=*}"; done)"
  [ "$BUDGET_OF" != "$ANCHOR" ] && [[ "$timed" == *" $BUDGET_OF "* ]] \
    || die "BUDGET_OF must name a run of THROUGHPUT_RUNS other than the anchor $ANCHOR (got '$BUDGET_OF'; runs:$timed)"
fi

STUDY=$OUT/link${TRAIN_RATE_MBIT}mbit
mkdir -p "$STUDY"
THREADS=$EVAL_THREADS  # study_evaluate's threads (training: one rank per emulated node, one thread each)
. scripts/study_lib.sh  # study_evaluate: the same evaluation as the Multi30k study

# 1. every config's speed on every reading link, side by side (interleaved rounds, kept as they land)
if [ "$THROUGHPUT_ROUNDS" != 0 ]; then
  for r in $READ_RATES; do
    tp=$STUDY/throughput_link${r}mbit.json
    if [ -n "${ARCHIVE:-}" ] && [ -f "$ARCHIVE/link${r}mbit/throughput.json" ]; then
      [ -f "$tp" ] || cp "$ARCHIVE/link${r}mbit/throughput.json" "$tp"  # the study's speeds, kept with it
      continue
    fi
    echo "== speed on the ${r} Mbit/s link: $THROUGHPUT_ROUNDS interleaved rounds ($(date +%T))"
    OMP_NUM_THREADS=1 python scripts/study_throughput.py --data "$DATA" --configs "$(echo $THROUGHPUT_RUNS)" \
      --anchor "$ANCHOR" --out "$tp" --rounds "$THROUGHPUT_ROUNDS" --warmup 5 --updates 10 --threads 1 \
      --emulated-rate-mbit "$r" --extra "--max-tokens $MAX_TOKENS" \
      --conditions "2 emulated nodes, 1 thread each; load average in raw[].load" \
      || die "the speed measurement on the ${r} Mbit/s link failed"
  done
fi

# emulated_train SAVE CONFIG [flags...]: fairseq-train of configs/multi30k/CONFIG.args on the
# 2 emulated nodes; node 0's output is SAVE/train.log (fairseq logs on rank 0), node 1's
# SAVE/train.node1.log.
emulated_train() {
  local save=$1 config=$2
  shift 2
  if [ -f "$save/.trained" ]; then return 0; fi
  local timeout=(--collective-timeout "${COLLECTIVE_TIMEOUT:-600}") cfg
  if [ "$config" = "$ANCHOR" ]; then
    # fairseq's own task, model and criterion, but the plugin is still loaded: fairseq 0.12
    # cannot train data-parallel on CPU by itself (under torchrun it divides by the GPU count,
    # and its DDP passes device ids for a CPU model; moe_fairseq/fairseq_patches.py, patches 2
    # and 3).  Its task has no --collective-timeout.
    timeout=()
  fi
  set -f; cfg=($(grep -v '^#' "configs/multi30k/$config.args")); set +f
  mkdir -p "$save"
  echo "== $(date '+%F %T') threads=1 parallel=1 nodes=2 rate_mbit=$TRAIN_RATE_MBIT max_tokens_per_rank=$MAX_TOKENS" >> "$save/train.log"
  printf '%s\n' "${cfg[@]}" "$@" > "$save/flags.txt"
  local cmd=(torchrun --nproc_per_node 1 --nnodes 2 --node_rank '$NODE_RANK' --master_addr '$MASTER_ADDR'
             --master_port '$MASTER_PORT' "$(command -v fairseq-train)" "$DATA" --user-dir "$REPO/moe_fairseq" "${cfg[@]}" "$@"
             "${timeout[@]}" --distributed-world-size 2 --cpu --distributed-backend gloo --num-workers 0
             --save-dir "$save" --max-update "$MAX_UPDATE" --max-tokens "$MAX_TOKENS" ${EXTRA:-})
  local line="" t
  for t in "${cmd[@]}"; do
    if [[ "$t" == '$'* ]]; then line+=" \"$t\""; else line+=" $(printf '%q' "$t")"; fi
  done
  local node_log='L='"$(printf '%q' "$save")"'/train.log; [ "$NODE_RANK" = 0 ] || L='"$(printf '%q' "$save")"'/train.node$NODE_RANK.log; exec >> "$L" 2>&1;'
  # `|| return`: this function runs in an `if`, where set -e does not stop it
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python scripts/emulated_cluster.py --nodes 2 \
    --rate-mbit "$TRAIN_RATE_MBIT" --master-port "${MASTER_PORT:-29500}" --grace 60 --quiet -- bash -c "$node_log exec$line" \
    || return 1
  touch "$save/.trained"
}

# read_and_archive SAVE NAME SEED: the run read at equal wall-clock on every link of READ_RATES
# (its interval checkpoint at the update it reaches in the anchor's time), with AVERAGE
# checkpoints averaged too, archived per link
read_and_archive() {
  local save=$1 name=$2 seed=$3 r
  for r in $READ_RATES; do
    local tp=$STUDY/throughput_link${r}mbit.json
    if has_speed "$tp"; then
      cp "$tp" "$STUDY/throughput.json"  # study_report reads OUT/throughput.json
      python scripts/study_report.py equal-time "$STUDY" --run "$name/seed$seed" --data "$DATA" --beam "$BEAM" \
        --threads "$EVAL_THREADS" || return 1
    else  # no speed for this link: no equal wall-clock reading (not the previous link's)
      rm -f "$STUDY/throughput.json"
      record_without "$save/record.json" "$save/record.json" equal_time
    fi
    average_run "$STUDY" "$name" "$seed" || return 1
    if [ -n "${ARCHIVE:-}" ]; then
      python scripts/study_report.py archive "$STUDY" --run "$name/seed$seed" --raw-dir "$DATA/raw" \
        --to "$ARCHIVE/link${r}mbit" || return 1
    fi
  done
}

record_without() {  # SRC DST KEY...: DST is SRC's record without KEYs (written atomically)
  python -c "import json,sys; r=json.load(open(sys.argv[1])); [r.pop(k, None) for k in sys.argv[3:]]; json.dump(r, open(sys.argv[2] + '.tmp', 'w'), indent=1)" "$@" \
    && mv "$2.tmp" "$2"
}

has_speed() { [ -f "$1" ] && [ "$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['rounds'])" "$1")" -gt 0 ]; }

average_run() {  # DIR NAME SEED: the averaged readings of DIR/NAME/seedSEED's record (final and equal-time update)
  [ "$AVERAGE" -ge 2 ] || return 0
  python scripts/study_report.py average "$1" --run "$2/seed$3" --data "$DATA" --last "$AVERAGE" --beam "$BEAM" \
    --threads "$EVAL_THREADS"
}

# read_at_budget SAVE NAME SEED: the run read at BUDGET_OF's budget on every link with a speed,
# in a mirror of SAVE (OUT/budget_<BUDGET_OF>/link<R>mbit/NAME/seedSEED), archived per link
read_at_budget() {
  local save=$1 name=$2 seed=$3 r f
  for r in $READ_RATES; do
    local tp=$STUDY/throughput_link${r}mbit.json dir=$OUT/budget_${BUDGET_OF}/link${r}mbit
    has_speed "$tp" || continue  # no speed on this link: nothing to read at
    local mirror=$dir/$name/seed$seed
    mkdir -p "$mirror"
    python scripts/study_report.py rebase "$tp" --anchor "$BUDGET_OF" --out "$dir/throughput.json" > /dev/null || return 1
    # the record without the anchor's readings (they are read again at this budget); the
    # evaluations copied (the mirror's new ones stay in it), the checkpoints linked
    record_without "$save/record.json" "$mirror/record.json" equal_time averaged
    cp "$save/flags.txt" "$mirror/"
    for f in "$save"/eval*/; do
      [ -f "$f/results.json" ] && [ ! -e "$mirror/$(basename "$f")" ] && cp -r "$f" "$mirror/"
    done
    for f in "$save"/checkpoint_*_*.pt "$save"/moe_shards; do
      [ -e "$f" ] && ln -sfn "$(realpath "$f")" "$mirror/$(basename "$f")"
    done
    python scripts/study_report.py equal-time "$dir" --run "$name/seed$seed" --data "$DATA" --beam "$BEAM" \
      --threads "$EVAL_THREADS" || return 1
    average_run "$dir" "$name" "$seed" || return 1
    if [ -n "${ARCHIVE:-}" ]; then
      python scripts/study_report.py archive "$dir" --run "$name/seed$seed" --raw-dir "$DATA/raw" \
        --to "$ARCHIVE/budget_${BUDGET_OF}/link${r}mbit" || return 1
    fi
  done
}

# read_complete REC SPEED: REC holds every reading asked for (the equal wall-clock one when
# SPEED is 1, the averaged ones when AVERAGE is set)
read_complete() {
  python -c "
import json, sys
rec, speed, last = json.load(open(sys.argv[1])), sys.argv[2] == '1', int(sys.argv[3])
avg = rec.get('averaged', {})
ok = (not speed or 'equal_time' in rec) and (last < 2 or (avg.get('last') == last and (not speed or 'equal_time' in avg)))
sys.exit(0 if ok else 1)" "$1" "$2" "$AVERAGE"
}

archived() {  # NAME SEED: archived on every reading link with every reading asked for
  local r rec speed
  [ -n "${ARCHIVE:-}" ] || return 1
  for r in $READ_RATES; do
    speed=0
    if has_speed "$STUDY/throughput_link${r}mbit.json" || has_speed "$ARCHIVE/link${r}mbit/throughput.json"; then speed=1; fi
    rec=$ARCHIVE/link${r}mbit/$1/seed$2/record.json
    [ -f "$rec" ] && read_complete "$rec" "$speed" || return 1
    if [ -n "$BUDGET_OF" ] && [ "$1" != "$ANCHOR" ] && [ "$speed" = 1 ]; then
      rec=$ARCHIVE/budget_${BUDGET_OF}/link${r}mbit/$1/seed$2/record.json
      [ -f "$rec" ] && read_complete "$rec" 1 || return 1
    fi
  done
}

# 2. training, BLEU, readings
failed=0
for seed in $SEEDS; do
  for spec in $RUNS; do
    parse_spec "$spec"
    save=$STUDY/$name/seed$seed
    if archived "$name" "$seed" || { [ -z "${ARCHIVE:-}" ] && [ -f "$save/record.json" ]; }; then
      echo "== $name seed $seed: done, skipping"; continue
    fi
    echo "== $name seed $seed: $MAX_UPDATE updates on 2 emulated nodes, then BLEU ($(date +%T))"
    if ! emulated_train "$save" "$config" "${flags[@]}" --seed "$seed"; then
      echo "run_emulated_study: $name seed $seed failed in training (see $save/train.log)" >&2; failed=1; continue
    fi
    if ! study_evaluate "$save"; then
      echo "run_emulated_study: $name seed $seed failed in evaluation (see $save/eval.log)" >&2; failed=1; continue
    fi
    python scripts/study_report.py record "$save" --config "$name" --seed "$seed" > /dev/null
    if ! read_and_archive "$save" "$name" "$seed"; then
      echo "run_emulated_study: $name seed $seed failed in its equal wall-clock reading (see above)" >&2; failed=1; continue
    fi
    if [ -n "$BUDGET_OF" ] && [ "$name" != "$ANCHOR" ] && ! read_at_budget "$save" "$name" "$seed"; then
      echo "run_emulated_study: $name seed $seed failed in its reading at ${BUDGET_OF}'s budget (see above)" >&2; failed=1
    fi
  done
done

# 3. the runs continued past their budget, for the validation curve alone (CONTINUE_TO)
if [ -n "$CONTINUE_TO" ]; then
  for seed in $SEEDS; do
    for spec in $RUNS; do
      parse_spec "$spec"
      save=$STUDY/$name/seed$seed cont=$OUT/continued_to$CONTINUE_TO/$name/seed$seed
      dest=${ARCHIVE:+$ARCHIVE/continued_to$CONTINUE_TO/$name/seed$seed}
      if [ -f "${dest:-$cont}/record.json" ]; then echo "== $name seed $seed: continued, skipping"; continue; fi
      [ -f "$save/.trained" ] || continue  # it failed above, and said so
      echo "== $name seed $seed: continued to $CONTINUE_TO updates, validation only ($(date +%T))"
      # from the run's last checkpoint; once the continuation has one of its own, from that
      # (fairseq prefers --restore-file over the save dir's checkpoint_last.pt)
      restore=()
      [ -f "$cont/checkpoint_last.pt" ] || restore=(--restore-file "$(realpath "$save/checkpoint_last.pt")")
      if ! MAX_UPDATE=$CONTINUE_TO emulated_train "$cont" "$config" "${flags[@]}" --seed "$seed" "${restore[@]}"; then
        echo "run_emulated_study: $name seed $seed failed in its continuation (see $cont/train.log)" >&2; failed=1; continue
      fi
      python scripts/study_report.py record "$cont" --config "$name" --seed "$seed" --no-eval > /dev/null
      if [ -n "$dest" ]; then
        mkdir -p "$dest" && cp "$cont/record.json" "$dest/record.json.tmp" && mv "$dest/record.json.tmp" "$dest/record.json"
      fi
    done
  done
fi
[ "$failed" = 0 ] || exit 1
echo "run_emulated_study: every run is done; report per link: python scripts/study_report.py report ${ARCHIVE:-$STUDY}/link<R>mbit --anchor $ANCHOR --raw-dir $DATA/raw --json ..."
