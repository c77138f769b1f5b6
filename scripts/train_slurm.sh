#!/usr/bin/env bash
#SBATCH --job-name=moe-fairseq
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=72:00:00
#SBATCH --output=slurm-%j.out
#
# Slurm training: one task per GPU; fairseq's own Slurm detection sets up the process group.
#
#   sbatch scripts/train_slurm.sh CONFIG DATA_BIN SAVE_DIR [extra fairseq-train args]
#   sbatch --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 scripts/train_slurm.sh configs/wmt10/moe_top2.args data-bin/wmt10 ckpt/top2
#
# How: srun starts SLURM_NTASKS copies of fairseq-train; given --distributed-port, fairseq reads
# SLURM_STEP_NODELIST (first host = rendezvous, via `scontrol show hostnames`), SLURM_PROCID
# (rank) and SLURM_LOCALID (GPU index), and checks that --distributed-world-size equals
# nodes x tasks per node.  Every task must see all GPUs of its node (device = SLURM_LOCALID):
# use --gpus-per-node, not --gpus-per-task / --gpu-bind.  The torchrun variables
# (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK) are unset, or fairseq would take the torchrun path.
# Environment: PORT (rendezvous port; default 10000 + job id % 20000), VENV (activate it
# first), DRY_RUN=1 (print the srun command only; runs outside Slurm too), COLLECTIVE_TIMEOUT
# (600, see train_torchrun.sh).  A task that exits non-zero ends the whole step
# (--kill-on-bad-exit); one that hangs is ended by the collective timeout of its peers.
# Several nodes: SAVE_DIR must be one directory every node shares (NFS, Lustre, ...): each rank
# writes its own expert shard there and rank 0 the checkpoint that points to them.  NCCL reads
# NCCL_SOCKET_IFNAME (the interface the nodes reach each other on), NCCL_IB_HCA or
# NCCL_IB_DISABLE=1 (InfiniBand or not) and NCCL_DEBUG=INFO (to diagnose a hang at start); srun
# passes the environment of sbatch on.  See docs/multi_gpu.md.
set -euo pipefail
# sbatch runs a copy of this script from the spool directory: find the repository from the
# submission directory when needed.
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
[ -d "$REPO/moe_fairseq" ] || REPO=${SLURM_SUBMIT_DIR:-$PWD}
[ -d "$REPO/moe_fairseq" ] || { echo "train_slurm.sh: set REPO to the moe-fairseq checkout" >&2; exit 2; }
. "$REPO/scripts/_launch_common.sh"
launch_init "$@"
shift 3
collective_timeout_args "$@"
if [ -n "${VENV:-}" ]; then . "$VENV/bin/activate"; fi

NNODES=${SLURM_NNODES:-1}
if [ -n "${SLURM_NTASKS:-}" ]; then
  NTASKS=$SLURM_NTASKS
else
  NTASKS=$((NNODES * ${SLURM_NTASKS_PER_NODE:-1}))
fi
JOB=${SLURM_JOB_ID:-0}
PORT=${PORT:-$((10000 + JOB % 20000))}


CMD=(srun --kill-on-bad-exit=1 env -u MASTER_ADDR -u MASTER_PORT -u WORLD_SIZE -u RANK -u LOCAL_RANK
     OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
     "${FAIRSEQ_TRAIN:-fairseq-train}" "$DATA_BIN" --user-dir "$REPO/moe_fairseq" "${CONFIG_ARGS[@]}"
     "${TIMEOUT_ARGS[@]}" --distributed-world-size "$NTASKS" --distributed-port "$PORT" --save-dir "$SAVE_DIR" "$@")
launch_run "job ${JOB}: "
