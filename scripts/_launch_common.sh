# Shared by train.sh, train_torchrun.sh and train_slurm.sh (sourced, not run).
# launch_init "$@": checks the three positional arguments (CONFIG DATA_BIN SAVE_DIR), printing the
#   calling script's header as usage otherwise; sets CONFIG DATA_BIN SAVE_DIR and CONFIG_ARGS, the
#   config file read exactly as `$(grep -v '^#' CONFIG)` (whole-line comments dropped, split on
#   whitespace, never globbed).  The caller then does `shift 3`.
# collective_timeout_args "$@": sets TIMEOUT_ARGS to --collective-timeout ${COLLECTIVE_TIMEOUT:-600} when
#   the command line (config + extra args) trains with the task translation_multi_moe, which has
#   that flag (fairseq's own tasks do not), else to nothing; COLLECTIVE_TIMEOUT=0 keeps torch's
#   default (30 min gloo, 10 min NCCL).  Extra args come later, so their --collective-timeout wins.
# launch_run LOG_PREFIX: prints the command under DRY_RUN=1, else runs CMD appending to train.log.
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

launch_run() {
  if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${CMD[@]}"; echo
    exit 0
  fi
  mkdir -p "$SAVE_DIR"
  echo "== $(date '+%F %T') ${1:-}$(printf '%q ' "${CMD[@]}")" >> "$SAVE_DIR/train.log"
  "${CMD[@]}" 2>&1 | tee -a "$SAVE_DIR/train.log"
}
