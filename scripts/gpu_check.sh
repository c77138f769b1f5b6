#!/usr/bin/env bash
# One command that checks the whole MoE path on a GPU machine (1 or more GPUs), or with DEVICE=cpu
# on any machine (the test suite runs `DEVICE=cpu QUICK=1 scripts/gpu_check.sh`).
#
#   [DEVICE=cuda] scripts/gpu_check.sh [--json OUT]
#
#   DEVICE=cuda|cpu  (default: cuda when torch sees a GPU, else cpu)
#   QUICK=1          smallest settings (3 updates per training run)
#   PYTHON=...       the interpreter (default: python); its bin directory (fairseq-train,
#                    torchrun, moe-consolidate, ...) goes first on PATH
#   STEPS=12345678   which steps to run (e.g. STEPS=3: expert parallelism only)
#   LAUNCHER=spawn|torchrun   how step 3 starts its processes (default: spawn)
#   EP_PROCS=N       processes of steps 3 and 5-8 (default: every visible GPU with cuda, 2 on cpu)
#   UPDATES=N        updates of each training run of steps 5-8 without QUICK (default: 40)
#   OUT=PATH         the JSON report (or --json PATH; default: gpu_check.json where it is run)
#   WORK=DIR         data, checkpoints and logs (default: a temporary directory, removed after
#                    a run without failures, kept and named otherwise)
#
# 1. precision tests: the MoE layer under autocast and in fp16/bf16 against the fp32 layer
#    (tests/test_precision.py, on DEVICE), and activation checkpointing through MoE layers;
# 2. the layer benchmark against the dense limit (scripts/bench_moe_layer.py --device DEVICE,
#    small sizes, plus decoder-step calls);
# 3. expert parallelism against the single-process layer (tests/ep_worker.py's suite: outputs,
#    input / router / expert gradients, capacity drops, uneven and empty batches, replicated
#    experts, Gating Dropout, activation checkpointing): with DEVICE=cuda on NCCL, one process
#    per GPU on cuda:LOCAL_RANK (needs 2 or more GPUs); with DEVICE=cpu on gloo with 2 CPU
#    processes, so CI runs the same code path;
# 4. host syncs per MoE layer forward+backward, decoder step and criterion statistics
#    (python -m moe_fairseq.moe.host_syncs: a CPU proxy count, with torch.cuda.set_sync_debug_mode
#    counts beside it on CUDA); skipped when this checkout has no such module;
# 5-8. scripts/gpu_check_fairseq.py: fairseq-train through torchrun on every process (expert
#    parallel; pytorch_ddp and legacy_ddp; fp32, --memory-efficient-fp16, --amp, --bf16), a
#    resume from the sharded checkpoint compared bit for bit with the uninterrupted run,
#    moe-consolidate + fairseq-generate on one device, words/s of MoE against its dense twin.
#
# It prints ONE table (step, status, seconds, detail) and writes it as JSON.  A skipped step says
# why (one GPU: no NCCL step; DEVICE=cpu: no CUDA-only precision).  Exit status 1 when a step
# failed (skips do not fail), 2 for bad settings.
set -euo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# settings first: a typo costs no torch import
OUT=${OUT:-gpu_check.json}
while [ "$#" -gt 0 ]; do
  case "$1" in
    --json) [ "$#" -ge 2 ] || { echo "gpu_check.sh: --json needs a path" >&2; exit 2; }; OUT=$2; shift 2 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (the only one is --json OUT; settings are environment variables)" >&2; exit 2 ;;
  esac
done
[[ $OUT == /* ]] || OUT="$CALLER_DIR/$OUT"
STEPS=${STEPS:-12345678}
[[ $STEPS =~ ^[1-8]+$ ]] || { echo "gpu_check.sh: STEPS must list steps 1 to 8 (e.g. 12345678 or 3; got '$STEPS')" >&2; exit 2; }
LAUNCHER=${LAUNCHER:-spawn}
case "$LAUNCHER" in
  spawn|torchrun) ;;
  *) echo "gpu_check.sh: LAUNCHER must be spawn or torchrun (got '$LAUNCHER')" >&2; exit 2 ;;
esac
UPDATES=${UPDATES:-40}
[[ $UPDATES =~ ^[0-9]+$ ]] && [ "$UPDATES" -ge 2 ] || { echo "gpu_check.sh: UPDATES must be an integer >= 2 (got '$UPDATES')" >&2; exit 2; }
QUICK_ARG=()
[ "${QUICK:-0}" = 1 ] && QUICK_ARG=(--quick)
read -r GPUS BIN_DIR < <("$PYTHON" -c "import os, sys, torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0, os.path.dirname(sys.executable))") || true
[[ ${GPUS:-} =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: '$PYTHON' cannot import torch: set PYTHON to the project's interpreter" >&2; exit 2; }
export PATH="$BIN_DIR:$PATH"  # fairseq-preprocess, fairseq-train, torchrun of this interpreter
DEVICE=${DEVICE:-$([ "$GPUS" -gt 0 ] && echo cuda || echo cpu)}
case "$DEVICE" in
  cpu|cuda) ;;
  *) echo "gpu_check.sh: DEVICE must be cpu or cuda (got '$DEVICE')" >&2; exit 2 ;;
esac
if [ "$DEVICE" = cuda ] && [ "$GPUS" -eq 0 ]; then
  echo "gpu_check.sh: DEVICE=cuda but torch sees no GPU; use DEVICE=cpu" >&2
  exit 2
fi
ASKED_PROCS=${EP_PROCS:-}
if [ "$DEVICE" = cuda ]; then BACKEND=nccl; EP_PROCS=${EP_PROCS:-$GPUS}; else BACKEND=gloo; EP_PROCS=${EP_PROCS:-2}; fi

if [ -n "${WORK:-}" ]; then
  mkdir -p "$WORK"; OWN_WORK=0
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX"); OWN_WORK=1
fi
WORK=$(cd "$WORK" && pwd)
mkdir -p "$WORK/logs"
ROWS=$WORK/rows.tsv
: > "$ROWS"
echo "== gpu_check: DEVICE=$DEVICE, GPUs visible: $GPUS, QUICK=${QUICK:-0}, work directory $WORK"

row() {  # row STEP STATUS SECONDS DETAIL: one line of the table
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(printf '%s' "$4" | tr '\t\n' '  ' | cut -c 1-300)" >> "$ROWS"
}
skip_row() {
  echo "skipped: $2"
  row "$1" skip 0 "skipped: $2"
}
# run_step STEP PATTERN CMD...: runs CMD with its output shown and kept in WORK/logs; the row's
# detail is the output lines matching PATTERN (joined by "; ") when it passes, its last line when
# it fails.
run_step() {
  local step=$1 pattern=$2 start=${EPOCHREALTIME/,/.} rc seconds detail
  shift 2
  local log="$WORK/logs/step${step%% *}.log"
  set +e
  "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  seconds=$(awk -v a="$start" -v b="${EPOCHREALTIME/,/.}" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" -eq 0 ]; then
    detail=$(grep -E -- "$pattern" "$log" | tr -s ' ' | paste -s -d ';' | sed 's/;/; /g' || true)
    row "$step" pass "$seconds" "${detail:-exit status 0}"
  else
    detail=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 || true)
    row "$step" fail "$seconds" "exit status $rc: $detail (log: $log)"
  fi
}

if [[ $STEPS == *1* ]]; then
  echo "== 1. precision tests ($DEVICE)"
  TESTS=(tests/test_precision.py)
  [ "${QUICK:-0}" = 1 ] || TESTS+=(tests/test_activation_checkpointing.py)
  run_step "1 precision tests" ' (passed|failed|skipped)' \
    env MOE_TEST_DEVICE="$DEVICE" "$PYTHON" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
fi

if [[ $STEPS == *2* ]]; then
  echo "== 2. MoE layer vs the dense limit ($DEVICE)"
  if [ "${QUICK:-0}" = 1 ]; then
    SIZES=(--tokens 256 --experts 4 --model-dim 32 --ffn-dim 64 --k 2 --repeats 1 --warmup 1
           --decode --decode-rows 8 --decode-experts 4 --decode-calls 2 --decode-repeats 1)
  else
    SIZES=(--tokens 2048 --experts 8 --model-dim 256 --ffn-dim 1024 --repeats 3 --warmup 1 --decode)
  fi
  run_step "2 layer benchmark" '^S=' \
    "$PYTHON" -W ignore scripts/bench_moe_layer.py "${SIZES[@]}" --device "$DEVICE" --skip-fairscale --skip-peak-mem
fi

if [[ $STEPS == *3* ]]; then
  echo "== 3. expert parallelism on $BACKEND ($LAUNCHER, $EP_PROCS processes)"
  if [ "$BACKEND" = nccl ] && [ -z "$ASKED_PROCS" ] && [ "$GPUS" -lt 2 ]; then
    skip_row "3 expert parallelism" "NCCL expert parallelism needs 2 or more GPUs (torch sees $GPUS)"
  elif ! [[ $EP_PROCS =~ ^[0-9]+$ ]] || [ "$EP_PROCS" -lt 2 ]; then
    echo "gpu_check.sh: EP_PROCS must be an integer >= 2 (got '$EP_PROCS')" >&2; exit 2
  else
    EP_ARGS=(--backend "$BACKEND")
    [ "${QUICK:-0}" = 1 ] && EP_ARGS+=(--quick)
    if [ "$LAUNCHER" = torchrun ]; then
      run_step "3 expert parallelism" 'scenarios passed' env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
        "$PYTHON" -W ignore -m torch.distributed.run --standalone --nproc_per_node "$EP_PROCS" tests/ep_worker.py "${EP_ARGS[@]}"
    else
      run_step "3 expert parallelism" 'scenarios passed' \
        "$PYTHON" -W ignore tests/ep_worker.py "${EP_ARGS[@]}" --nprocs "$EP_PROCS"
    fi
  fi
fi

if [[ $STEPS == *4* ]]; then
  echo "== 4. host syncs ($DEVICE)"
  if "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('moe_fairseq.moe.host_syncs') is None)"; then
    run_step "4 host syncs" '^[A-Za-z0-9_]+ +[0-9]+ ' "$PYTHON" -W ignore -m moe_fairseq.moe.host_syncs --device "$DEVICE" --json "$WORK/host_syncs.json"
  else
    skip_row "4 host syncs" "moe_fairseq.moe.host_syncs not available"
  fi
fi

FAIRSEQ_STEPS=$(printf '%s' "$STEPS" | tr -cd '5678')
if [ -n "$FAIRSEQ_STEPS" ]; then
  if ! [[ $EP_PROCS =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_check.sh: EP_PROCS must be an integer >= 1 for steps 5-8 (got '$EP_PROCS')" >&2; exit 2
  fi
  if ! "$PYTHON" -W ignore scripts/gpu_check_fairseq.py --device "$DEVICE" --nprocs "$EP_PROCS" --work "$WORK" \
      --rows "$ROWS" --steps "$FAIRSEQ_STEPS" --updates "$UPDATES" "${QUICK_ARG[@]}"; then
    row "5-8 fairseq" fail 0 "scripts/gpu_check_fairseq.py stopped before its steps ended (see its output above)"
  fi
fi

set +e
"$PYTHON" scripts/gpu_check_report.py "$ROWS" --json "$OUT" --device "$DEVICE" --gpus "$GPUS" "${QUICK_ARG[@]}"
STATUS=$?
set -e
if [ "$STATUS" -eq 0 ]; then
  [ "$OWN_WORK" = 0 ] || rm -rf "$WORK"
  echo "== gpu_check: OK"
else
  echo "== gpu_check: FAILED (logs in $WORK)"
  exit 1
fi
