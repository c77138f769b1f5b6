#!/usr/bin/env python3
"""Short progress lines on a terminal from fairseq's JSON log lines (stdin -> stdout).

The filter of moe_fairseq/experiments/progress_view.py (the same as
`python -m moe_fairseq.experiments.progress_view`); it imports no torch or fairseq."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.progress_view import cli_main

if __name__ == "__main__":
    cli_main()
