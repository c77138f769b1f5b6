#!/usr/bin/env bash
# Data-/expert-parallel training with torchrun: one process per GPU, on one or several machines.
#
#   [NPROC=8] scripts/train_torchrun.sh CONFIG DATA_BIN SAVE_DIR [extra fairseq-train args]
#
# One machine, all its GPUs:   NPROC=8 scripts/train_torchrun.sh configs/wmt10/moe_top2.args data-bin/wmt10 ckpt/top2
# Several machines (run on each, same MASTER_ADDR/MASTER_PORT, NODE_RANK = 0 .. NNODES-1):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC=4 scripts/train_torchrun.sh CONFIG DATA SAVE
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC=4 scripts/train_torchrun.sh CONFIG DATA SAVE
# CPU test of the distributed path (gloo, no GPU):  CPU=1 NPROC=2 scripts/train_torchrun.sh ...
#
# Environment: NPROC (processes per machine; default: the GPUs nvidia-smi lists, 2 with CPU=1),
# NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), CPU (unset; 1 adds
# --cpu --distributed-backend gloo), DRY_RUN (1: print the command only), COLLECTIVE_TIMEOUT
# (600: --collective-timeout for the task translation_multi_moe, seconds a rank waits in a
# collective for a dead or hung peer before the job fails; 0: torch's default, 30 min on gloo).
# Always passes --distributed-world-size NNODES*NPROC.  With --moe-expert-count E, each rank
# holds E/W experts: choose W dividing E (see configs/README.md).  Fairseq's own flags that
# come later win (extra args), e.g. --update-freq to keep the batch when W changes.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$REPO/scripts/_launch_common.sh"
launch_init "$@"
shift 3
collective_timeout_args "$@"

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${NPROC:-}" ]; then
  if [ -n "${CPU:-}" ]; then
    NPROC=2
  elif command -v nvidia-smi > /dev/null 2>&1; then
    NPROC=$(nvidia-smi -L | grep -c '^GPU' || true)
  else
    NPROC=0
  fi
fi
if [ "$NPROC" -lt 1 ]; then
  echo "train_torchrun.sh: no GPU found: set NPROC, or CPU=1 for a CPU (gloo) run" >&2
  exit 2
fi
WORLD=$((NNODES * NPROC))

DEVICE_ARGS=()
if [ -n "${CPU:-}" ]; then
  DEVICE_ARGS=(--cpu --distributed-backend gloo)
fi
FAIRSEQ_TRAIN=${FAIRSEQ_TRAIN:-$(command -v fairseq-train || echo fairseq-train)}

CMD=("${TORCHRUN:-torchrun}" --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK"
     --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     "$FAIRSEQ_TRAIN" "$DATA_BIN" --user-dir "$REPO/moe_fairseq" "${CONFIG_ARGS[@]}"
     "${TIMEOUT_ARGS[@]}" --distributed-world-size "$WORLD" "${DEVICE_ARGS[@]}" --save-dir "$SAVE_DIR" "$@")
launch_run
