#!/usr/bin/env bash
# Train one experiment on one machine (one process: CPU or one GPU).
#
#   scripts/train.sh CONFIG DATA_BIN SAVE_DIR [extra fairseq-train args]
#
#   scripts/train.sh configs/multi30k/moe_top2.args data-bin/multi30k checkpoints/m30k_top2 --cpu
#   scripts/train.sh configs/wmt10/dense.args data-bin/wmt10 checkpoints/wmt10_dense --max-update 50000
#
# CONFIG is an argument file (configs/README.md): one flag per line, whole-line '#' comments.
# Extra arguments come after the config's, so they win (argparse keeps the last value); e.g.
# --cpu, --max-update N, --lang-pairs ... .  The output is also appended to SAVE_DIR/train.log
# (what scripts/plot_convergence.py reads).  DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
if [ "$#" -lt 3 ]; then
  sed -n '2,/^set -euo/p' "$0" | grep '^#' | grep -v '^#SBATCH' | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
CONFIG=$1 DATA_BIN=$2 SAVE_DIR=$3
shift 3
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ -f "$CONFIG" ] || { echo "train.sh: no config file $CONFIG" >&2; exit 2; }

# Exactly `$(grep -v '^#' CONFIG)`: whole-line comments dropped, whitespace splitting, no
# quote processing; globbing off so a value is never expanded against file names.
set -f
CONFIG_ARGS=($(grep -v '^#' "$CONFIG" || true))
set +f

CMD=("${FAIRSEQ_TRAIN:-fairseq-train}" "$DATA_BIN" --user-dir "$REPO/moe_fairseq"
     "${CONFIG_ARGS[@]}" --save-dir "$SAVE_DIR" "$@")
if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
mkdir -p "$SAVE_DIR"
echo "== $(date '+%F %T') $(printf '%q ' "${CMD[@]}")" >> "$SAVE_DIR/train.log"
"${CMD[@]}" 2>&1 | tee -a "$SAVE_DIR/train.log"
