#!/usr/bin/env python
"""The one table of scripts/gpu_check.sh, and its JSON: every step's pass, fail or skip.

The command line of moe_fairseq/experiments/gpu_check_report.py (the same as
`python -m moe_fairseq.experiments.gpu_check_report`; --help for its usage)."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.gpu_check_report import cli_main

if __name__ == "__main__":
    cli_main()
