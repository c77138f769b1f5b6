#!/usr/bin/env bash
# The Multi30k study on the emulated two-node cluster (docs/emulated_network.md): every run
# trains expert-parallel over 2 emulated nodes (one rank each, gloo over a tbf-shaped link) for
# the same wall-clock budget, then is evaluated, recorded and archived with the Multi30k study's
# machinery (scripts/study_lib.sh's study_evaluate, scripts/study_report.py record / archive /
# report), so `study_report.py report` reads the result like docs/study_runs.
#
#   sudo DATA=data-bin/multi30k OUT=emulated_study ARCHIVE=docs/emulated_study_runs \
#        RATE_MBIT=250 BUDGET_MINUTES=60 bash scripts/run_emulated_study.sh
#
# The link: RATE_MBIT (default 250: an all-to-all share of about 45% for moe_top2 on this
# 2-core host, docs/emulated_network.md; 0 = unshaped).  Runs land in OUT/link<RATE>mbit/NAME/seedS
# and ARCHIVE/link<RATE>mbit/NAME/seedS, so the unshaped and the shaped link are two studies
# side by side (run the script once per RATE_MBIT).
#
# Budget: fairseq's --stop-time-hours (BUDGET_MINUTES / 60): its training time is summed over
# the ranks (so both stop at the same update) and kept in the checkpoint, so an interrupted run
# resumes from checkpoint_last.pt with the time it had used.  --max-update is lifted to
# MAX_UPDATE (default 1000000) so that time alone decides; the configs' learning-rate schedule
# and checkpoint interval are kept.
#
# RUNS: space-separated NAME=CONFIG[:FLAG,VALUE,...] (CONFIG from configs/multi30k; the flags go
# after the config's and win).  Default: top-2, Gate-Drop at p = 0.1, 0.3,
# 0.5, Gate-Expert-Drop at 0.3, and fairseq's dense transformer data-parallel as the anchor
# (fairseq's task, model and criterion; the plugin only fixes fairseq's CPU data parallelism).
# SEEDS (default "1 2"): rotated seed-major (seed 1 of every run, then seed 2, ...), so work
# that stops early leaves complete seeds; narrow RUNS for the runs that need more seeds.
#
# Resumable: a run with OUT/.../record.json or ARCHIVE/.../record.json is done; a trained run
# (SAVE/.trained) is only evaluated; a run interrupted in training resumes from its checkpoint.
#
# Environment: DATA, OUT, ARCHIVE (optional), RATE_MBIT, BUDGET_MINUTES (60), MAX_UPDATE,
# RUNS, SEEDS, BEAM (5), EXTRA (more fairseq-train flags for every run, e.g. for a smoke test),
# MASTER_PORT (29500, inside the namespaces), COLLECTIVE_TIMEOUT (600 s, as train_torchrun.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
if ! command -v fairseq-train > /dev/null && [ -f "${VENV:-.venv}/bin/activate" ]; then . "${VENV:-.venv}/bin/activate"; fi
DATA=${DATA:-data-bin/multi30k}
OUT=${OUT:-emulated_study}
RATE_MBIT=${RATE_MBIT:-250}
BUDGET_MINUTES=${BUDGET_MINUTES:-60}
MAX_UPDATE=${MAX_UPDATE:-1000000}
SEEDS=${SEEDS:-"1 2"}
BEAM=${BEAM:-5}
ANCHOR=fairseq_dense
THREADS=1  # one rank per emulated node, one intra-op thread each (study_evaluate uses it too)
RUNS=${RUNS:-"moe_top2=moe_top2
  gate_drop_p0.1=moe_top2_gate_drop:--moe-gating-dropout,0.1
  gate_drop_p0.3=moe_top2_gate_drop:--moe-gating-dropout,0.3
  gate_drop_p0.5=moe_top2_gate_drop:--moe-gating-dropout,0.5
  gate_expert_drop_p0.3=moe_top2_gate_expert_drop:--moe-gating-dropout,0.3
  fairseq_dense=fairseq_dense"}

die() { echo "run_emulated_study: $*" >&2; exit 2; }
[[ "$RATE_MBIT" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "RATE_MBIT must be a rate in Mbit/s, 0 for unshaped (got '$RATE_MBIT')"
[[ "$BUDGET_MINUTES" =~ ^[0-9]+([.][0-9]+)?$ ]] && [ "$BUDGET_MINUTES" != 0 ] || die "BUDGET_MINUTES must be a positive number of minutes (got '$BUDGET_MINUTES')"
[ -f "$DATA/dict.txt" ] || die "no fairseq data-bin at DATA=$DATA (bash data_prep/prepare_multi30k.sh --destdir $DATA)"
command -v fairseq-train > /dev/null || die "fairseq-train not found (bash scripts/setup_env.sh)"
missing=$(python -c "import sys; sys.path.insert(0, 'scripts'); import emulated_cluster as e; print(e.missing_requirements() or '')")
[ -z "$missing" ] || die "$missing"
for spec in $RUNS; do
  config=${spec#*=}; config=${config%%:*}
  [[ "$spec" == *=* ]] || die "RUNS: '$spec' is not NAME=CONFIG[:FLAG,VALUE,...]"
  [ -f "configs/multi30k/$config.args" ] || die "RUNS: no config configs/multi30k/$config.args (in '$spec')"
done

LINK=link${RATE_MBIT}mbit
STUDY=$OUT/$LINK
mkdir -p "$STUDY"
. scripts/study_lib.sh  # study_evaluate: the same evaluation as the Multi30k study
HOURS=$(python -c "print($BUDGET_MINUTES / 60)")

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
  echo "== $(date '+%F %T') threads=$THREADS parallel=1 nodes=2 rate_mbit=$RATE_MBIT budget_minutes=$BUDGET_MINUTES" >> "$save/train.log"
  printf '%s\n' "${cfg[@]}" "$@" > "$save/flags.txt"
  local cmd=(torchrun --nproc_per_node 1 --nnodes 2 --node_rank '$NODE_RANK' --master_addr '$MASTER_ADDR'
             --master_port '$MASTER_PORT' "$(command -v fairseq-train)" "$DATA" --user-dir "$REPO/moe_fairseq" "${cfg[@]}" "$@"
             "${timeout[@]}" --distributed-world-size 2 --cpu --distributed-backend gloo --num-workers 0
             --save-dir "$save" --stop-time-hours "$HOURS" --max-update "$MAX_UPDATE" ${EXTRA:-})
  local line="" t
  for t in "${cmd[@]}"; do
    if [[ "$t" == '$'* ]]; then line+=" \"$t\""; else line+=" $(printf '%q' "$t")"; fi
  done
  local node_log='L='"$(printf '%q' "$save")"'/train.log; [ "$NODE_RANK" = 0 ] || L='"$(printf '%q' "$save")"'/train.node$NODE_RANK.log; exec >> "$L" 2>&1;'
  # `|| return`: this function runs in an `if`, where set -e does not stop it
  OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS python scripts/emulated_cluster.py --nodes 2 \
    --rate-mbit "$RATE_MBIT" --master-port "${MASTER_PORT:-29500}" --grace 60 --quiet -- bash -c "$node_log exec$line" \
    || return 1
  touch "$save/.trained"
}

failed=0
for seed in $SEEDS; do
  for spec in $RUNS; do
    name=${spec%%=*} rest=${spec#*=}
    config=${rest%%:*} flags=()
    if [[ "$rest" == *:* ]]; then IFS=, read -r -a flags <<< "${rest#*:}"; fi
    save=$STUDY/$name/seed$seed
    if [ -f "$save/record.json" ] || { [ -n "${ARCHIVE:-}" ] && [ -f "$ARCHIVE/$LINK/$name/seed$seed/record.json" ]; }; then
      echo "== $LINK $name seed $seed: done, skipping"; continue
    fi
    echo "== $LINK $name seed $seed: training for $BUDGET_MINUTES min on 2 emulated nodes, then BLEU ($(date +%T))"
    if ! emulated_train "$save" "$config" "${flags[@]}" --seed "$seed"; then
      echo "run_emulated_study: $name seed $seed failed in training (see $save/train.log)" >&2; failed=1; continue
    fi
    if ! study_evaluate "$save"; then
      echo "run_emulated_study: $name seed $seed failed in evaluation (see $save/eval.log)" >&2; failed=1; continue
    fi
    python scripts/study_report.py record "$save" --config "$name" --seed "$seed" > /dev/null
    if [ -n "${ARCHIVE:-}" ]; then
      python scripts/study_report.py archive "$STUDY" --run "$name/seed$seed" --raw-dir "$DATA/raw" --to "$ARCHIVE/$LINK"
    fi
  done
done
[ "$failed" = 0 ] || exit 1
echo "run_emulated_study: every run of $LINK is done; report: python scripts/study_report.py report ${ARCHIVE:-$OUT}/$LINK --anchor $ANCHOR --raw-dir $DATA/raw --json ..."
