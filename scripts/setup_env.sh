#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install everything.
# torch goes in first and explicitly: the CPU build by default, from PyTorch's CPU wheel index
# (a plain `pip install torch` on Linux pulls the CUDA build, several GB). For CUDA set
# TORCH_INDEX_URL, e.g.
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 TORCH_VERSION=2.6.0 bash scripts/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip setuptools wheel
if ! python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    python -m pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
  elif ! python -m pip install -q --retries 1 "torch==$TORCH_VERSION" --index-url "${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}"; then
    echo "setup_env.sh: PyTorch's CPU wheel index is unreachable; installing torch==$TORCH_VERSION from the default index" >&2
    python -m pip install -q "torch==$TORCH_VERSION"
  fi
fi
# fairseq (fairseq-fixed on Python 3.11+) compiles its extensions: about 3 minutes, once.
python -m pip install -q -e ".[test]"
python -c "import torch, fairseq, moe_fairseq; print('torch', torch.__version__, '| fairseq', fairseq.__version__)"
