#!/usr/bin/env bash
# One-command check of a GPU machine (or, with DEVICE=cpu, of any machine: CI runs it that way).
#
#   DEVICE=cuda|cpu  (default: cuda when torch sees a GPU, else cpu)
#   QUICK=1          smallest settings (what tests/test_gpu_check.py runs)
#   PYTHON=...       the interpreter (default: python)
#   STEPS=123        which steps to run (e.g. STEPS=3: expert parallelism only)
#   LAUNCHER=spawn|torchrun   how step 3 starts its processes (default: spawn)
#   EP_PROCS=N       step 3's processes (default: every visible GPU with cuda, 2 on cpu)
#
# 1. precision tests: the MoE layer under autocast and in fp16/bf16 against the fp32 layer
#    (tests/test_precision.py, on DEVICE), and activation checkpointing through MoE layers;
# 2. the layer benchmark against the dense limit (scripts/bench_moe_layer.py --device DEVICE,
#    small sizes, plus decoder-step calls);
# 3. expert parallelism against the single-process layer (tests/ep_worker.py's suite: outputs,
#    input / router / expert gradients, capacity drops, uneven and empty batches, replicated
#    experts, Gating Dropout, activation checkpointing): with DEVICE=cuda on NCCL, one process
#    per GPU on cuda:LOCAL_RANK (needs 2 or more GPUs); with DEVICE=cpu on gloo with 2 CPU
#    processes, so CI runs the same code path.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# settings first: a typo costs no torch import
STEPS=${STEPS:-123}
[[ $STEPS =~ ^[123]+$ ]] || { echo "gpu_check.sh: STEPS must list steps 1, 2, 3 (e.g. 123 or 3; got '$STEPS')" >&2; exit 2; }
LAUNCHER=${LAUNCHER:-spawn}
case "$LAUNCHER" in
  spawn|torchrun) ;;
  *) echo "gpu_check.sh: LAUNCHER must be spawn or torchrun (got '$LAUNCHER')" >&2; exit 2 ;;
esac
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
DEVICE=${DEVICE:-$([ "$GPUS" -gt 0 ] && echo cuda || echo cpu)}
case "$DEVICE" in
  cpu|cuda) ;;
  *) echo "gpu_check.sh: DEVICE must be cpu or cuda (got '$DEVICE')" >&2; exit 2 ;;
esac
if [ "$DEVICE" = cuda ] && [ "$GPUS" -eq 0 ]; then
  echo "gpu_check.sh: DEVICE=cuda but torch sees no GPU; use DEVICE=cpu" >&2
  exit 2
fi
echo "== gpu_check: DEVICE=$DEVICE, GPUs visible: $GPUS, QUICK=${QUICK:-0}"

if [[ $STEPS == *1* ]]; then
  echo "== 1. precision tests ($DEVICE)"
  TESTS=(tests/test_precision.py)
  [ "${QUICK:-0}" = 1 ] || TESTS+=(tests/test_activation_checkpointing.py)
  MOE_TEST_DEVICE=$DEVICE "$PYTHON" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
fi

if [[ $STEPS == *2* ]]; then
  echo "== 2. MoE layer vs the dense limit ($DEVICE)"
  if [ "${QUICK:-0}" = 1 ]; then
    SIZES=(--tokens 256 --experts 4 --model-dim 32 --ffn-dim 64 --k 2 --repeats 1 --warmup 1
           --decode --decode-rows 8 --decode-experts 4 --decode-calls 2 --decode-repeats 1)
  else
    SIZES=(--tokens 2048 --experts 8 --model-dim 256 --ffn-dim 1024 --repeats 3 --warmup 1 --decode)
  fi
  "$PYTHON" -W ignore scripts/bench_moe_layer.py "${SIZES[@]}" --device "$DEVICE" --skip-fairscale --skip-peak-mem
fi

if [[ $STEPS == *3* ]]; then
  ASKED_PROCS=${EP_PROCS:-}
  if [ "$DEVICE" = cuda ]; then BACKEND=nccl; EP_PROCS=${EP_PROCS:-$GPUS}; else BACKEND=gloo; EP_PROCS=${EP_PROCS:-2}; fi
  echo "== 3. expert parallelism on $BACKEND ($LAUNCHER, $EP_PROCS processes)"
  if [ "$BACKEND" = nccl ] && [ -z "$ASKED_PROCS" ] && [ "$GPUS" -lt 2 ]; then
    echo "skipped: NCCL expert parallelism needs 2 or more GPUs (torch sees $GPUS)"
  elif ! [[ $EP_PROCS =~ ^[0-9]+$ ]] || [ "$EP_PROCS" -lt 2 ]; then
    echo "gpu_check.sh: EP_PROCS must be an integer >= 2 (got '$EP_PROCS')" >&2; exit 2
  else
    EP_ARGS=(--backend "$BACKEND")
    [ "${QUICK:-0}" = 1 ] && EP_ARGS+=(--quick)
    if [ "$LAUNCHER" = torchrun ]; then
      OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" -W ignore -m torch.distributed.run --standalone \
        --nproc_per_node "$EP_PROCS" tests/ep_worker.py "${EP_ARGS[@]}"
    else
      "$PYTHON" -W ignore tests/ep_worker.py "${EP_ARGS[@]}" --nprocs "$EP_PROCS"
    fi
  fi
fi
echo "== gpu_check: OK"
