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
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$REPO/scripts/_launch_common.sh"
launch_init "$@"
shift 3
CMD=("${FAIRSEQ_TRAIN:-fairseq-train}" "$DATA_BIN" --user-dir "$REPO/moe_fairseq"
     "${CONFIG_ARGS[@]}" --save-dir "$SAVE_DIR" "$@")
launch_run
