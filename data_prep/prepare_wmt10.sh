#!/usr/bin/env bash
# Thin wrapper: runs data_prep/prepare_wmt10.py (which hands a hand-assembled {split}.{xx}-en.{lang}
# directory to moe-prepare) with this checkout on PYTHONPATH, from any directory. To fetch WMT-10
# instead: moe-prepare --wmt10 --out data-bin/wmt10 (docs/data.md).
# Relative paths in the arguments stay relative to the caller's directory. Usage: --help.
# PYTHON picks the interpreter (default: python from PATH, e.g. the project's venv).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m data_prep.prepare_wmt10 "$@"
