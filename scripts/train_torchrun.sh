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
# Environment: NPROC (processes per machine; default: the GPUs torch sees, so CUDA_VISIBLE_DEVICES
# counts, asked of the interpreter on fairseq-train's #! line or PYTHON; 2 with CPU=1), NNODES (1),
# NODE_RANK (0 .. NNODES-1; required when NNODES > 1), MASTER_ADDR (node 0's address; required
# when NNODES > 1, 127.0.0.1 on one machine), MASTER_PORT (29500), CPU (unset; 1 adds --cpu
# --distributed-backend gloo), DRY_RUN (1: print the command only), COLLECTIVE_TIMEOUT (600:
# --collective-timeout for the task translation_multi_moe, seconds a rank waits in a collective
# for a dead or hung peer before the job fails; 0: torch's default, 30 min on gloo).
# Always passes --distributed-world-size NNODES*NPROC.  With --moe-expert-count E, W must divide
# E (each rank holds E/W experts) or E divide W (experts replicated; see configs/README.md).  Fairseq's own flags that
# come later win (extra args), e.g. --update-freq to keep the batch when W changes.
# Several machines: SAVE_DIR must be one directory every machine shares (NFS, Lustre, ...):
# each rank writes its own expert shard there and rank 0 the checkpoint that points to them,
# so a machine-local directory leaves checkpoints that no machine can load or resume.
# NCCL: NCCL_SOCKET_IFNAME=eth0 (the interface the machines reach each other on),
# NCCL_IB_HCA=mlx5 (which InfiniBand adapters) or NCCL_IB_DISABLE=1 (no InfiniBand),
# NCCL_DEBUG=INFO (to diagnose a hang at start); GLOO_SOCKET_IFNAME with CPU=1.  See docs/multi_gpu.md.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$REPO/scripts/_launch_common.sh"
launch_init "$@"
shift 3
collective_timeout_args "$@"

NNODES=${NNODES:-1}
check_nodes train_torchrun.sh
MASTER_PORT=${MASTER_PORT:-29500}
FAIRSEQ_TRAIN=${FAIRSEQ_TRAIN:-$(command -v fairseq-train || echo fairseq-train)}
if [ -n "${NPROC:-}" ]; then
  [[ $NPROC =~ ^[1-9][0-9]*$ ]] || { echo "train_torchrun.sh: NPROC must be an integer >= 1 (got '$NPROC')" >&2; exit 2; }
elif [ -n "${CPU:-}" ]; then
  NPROC=2
else
  NPROC=$(visible_gpus "$FAIRSEQ_TRAIN")
  if [ "$NPROC" -lt 1 ]; then
    echo "train_torchrun.sh: torch sees no GPU (CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES-unset}'): set NPROC, or CPU=1 for a CPU (gloo) run" >&2
    exit 2
  fi
fi
WORLD=$((NNODES * NPROC))

DEVICE_ARGS=()
if [ -n "${CPU:-}" ]; then
  DEVICE_ARGS=(--cpu --distributed-backend gloo)
fi
CMD=("${TORCHRUN:-torchrun}" --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK"
     --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     "$FAIRSEQ_TRAIN" "$DATA_BIN" --user-dir "$REPO/moe_fairseq" "${CONFIG_ARGS[@]}"
     "${TIMEOUT_ARGS[@]}" --distributed-world-size "$WORLD" "${DEVICE_ARGS[@]}" --save-dir "$SAVE_DIR" "$@")
launch_run
