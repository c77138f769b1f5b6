# Shared by train.sh, train_torchrun.sh and train_slurm.sh (sourced, not run).
# launch_init "$@": checks the three positional arguments (CONFIG DATA_BIN SAVE_DIR), printing the
#   calling script's header as usage otherwise; sets CONFIG DATA_BIN SAVE_DIR and CONFIG_ARGS, the
#   config file read exactly as `$(grep -v '^#' CONFIG)` (whole-line comments dropped, split on
#   whitespace, never globbed).  The caller then does `shift 3`.
# collective_timeout_args "$@": sets TIMEOUT_ARGS to --collective-timeout ${COLLECTIVE_TIMEOUT:-600} when
#   the command line (config + extra args) trains with the task translation_multi_moe, which has
#   that flag (fairseq's own tasks do not), else to nothing; COLLECTIVE_TIMEOUT=0 keeps torch's
#   default (30 min gloo, 10 min NCCL).  Extra args come later, so their --collective-timeout wins.
# visible_gpus FAIRSEQ_TRAIN: prints how many GPUs torch sees, asked of the interpreter that runs
#   fairseq-train (PYTHON if set, else the one on FAIRSEQ_TRAIN's #! line, else python3), so that
#   CUDA_VISIBLE_DEVICES counts: `nvidia-smi -L` lists every GPU of the machine, and two ranks
#   given the same device end in NCCL's "Duplicate GPU detected".
# check_nodes SCRIPT: NNODES must be >= 1; with NNODES > 1, MASTER_ADDR (the address of node 0)
#   and NODE_RANK (0 .. NNODES-1) must be set: a default of 127.0.0.1 would make every machine
#   wait for a rendezvous of its own.  One-line error otherwise.
# launch_run LOG_PREFIX: prints the command under DRY_RUN=1, else runs CMD appending to train.log
#   (and showing short progress lines on a terminal: scripts/progress_view.py; needs REPO).
launch_init() {
  if [ "$#" -lt 3 ]; then
    sed -n '2,/^set -euo/p' "$0" | grep '^#' | grep -v '^#SBATCH' | sed 's/^# \{0,1\}//' >&2
    exit 2
  fi
  CONFIG=$1 DATA_BIN=$2 SAVE_DIR=$3
  [ -f "$CONFIG" ] || { echo "$(basename "$0"): no config file $CONFIG" >&2; exit 2; }
  set -f
  CONFIG_ARGS=($(grep -v '^#' "$CONFIG" || true))
  set +f
}

collective_timeout_args() {
  TIMEOUT_ARGS=()
  # a loop, not `printf | grep -q`: under `set -o pipefail`, grep -q exiting at the first match
  # can kill printf with SIGPIPE and turn the match into a failure (seen under load)
  local arg
  for arg in "${CONFIG_ARGS[@]}" "$@"; do
    if [ "$arg" = translation_multi_moe ] || [[ $arg == *=translation_multi_moe ]]; then
      TIMEOUT_ARGS=(--collective-timeout "${COLLECTIVE_TIMEOUT:-600}")
      break
    fi
  done
}

visible_gpus() {
  local py=()
  if [ -n "${PYTHON:-}" ]; then
    py=("$PYTHON")
  elif [ -f "$1" ] && [ "$(head -c 2 "$1")" = '#!' ]; then
    read -r -a py <<< "$(head -n 1 "$1" | cut -c 3-)"  # "#!/venv/bin/python" or "#!/usr/bin/env python3"
  fi
  [ "${#py[@]}" -gt 0 ] || py=(python3)
  local n
  if ! n=$("${py[@]}" -c "import torch; print(torch.cuda.device_count())" 2> /dev/null) || ! [[ $n =~ ^[0-9]+$ ]]; then
    echo "$(basename "$0"): cannot count GPUs: '${py[*]} -c \"import torch\"' failed; set PYTHON to the interpreter of fairseq-train, or NPROC" >&2
    exit 2
  fi
  echo "$n"
}

check_nodes() {
  local me=$1
  [[ $NNODES =~ ^[1-9][0-9]*$ ]] || { echo "$me: NNODES must be an integer >= 1 (got '$NNODES')" >&2; exit 2; }
  if [ "$NNODES" -gt 1 ]; then
    [ -n "${MASTER_ADDR:-}" ] || {
      echo "$me: NNODES=$NNODES needs MASTER_ADDR, the address of node 0 that every machine can reach" >&2; exit 2; }
    [ -n "${NODE_RANK:-}" ] || { echo "$me: NNODES=$NNODES needs NODE_RANK (0 .. $((NNODES - 1)), 0 on the MASTER_ADDR machine)" >&2; exit 2; }
  fi
  NODE_RANK=${NODE_RANK:-0}
  if ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
    echo "$me: NODE_RANK must be 0 .. $((NNODES - 1)) with NNODES=$NNODES (got '$NODE_RANK')" >&2; exit 2
  fi
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
}

launch_run() {
  if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${CMD[@]}"; echo
    exit 0
  fi
  mkdir -p "$SAVE_DIR"
  echo "== $(date '+%F %T') ${1:-}$(printf '%q ' "${CMD[@]}")" >> "$SAVE_DIR/train.log"
  # On a terminal (or PROGRESS_VIEW=1) fairseq's JSON progress lines are shown short; train.log
  # keeps them as fairseq wrote them (the plotting and study tools read it).  PROGRESS_VIEW=0: as is.
  if [ "${PROGRESS_VIEW:-}" = 1 ] || { [ -z "${PROGRESS_VIEW:-}" ] && [ -t 1 ]; }; then
    "${CMD[@]}" 2>&1 | tee -a "$SAVE_DIR/train.log" | python3 "$REPO/scripts/progress_view.py"
  else
    "${CMD[@]}" 2>&1 | tee -a "$SAVE_DIR/train.log"
  fi
}
