#!/usr/bin/env python
"""Paired bootstrap significance between runs' saved moe-evaluate outputs.

The command line of moe_fairseq/experiments/compare_runs.py (the same as
`python -m moe_fairseq.experiments.compare_runs`; --help for its usage)."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.compare_runs import cli_main

if __name__ == "__main__":
    cli_main()
