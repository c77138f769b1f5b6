#!/usr/bin/env python
"""Steps 5-8 of scripts/gpu_check.sh: fairseq's own command lines, end to end, on this machine.

The command line of moe_fairseq/experiments/gpu_check_fairseq.py (the same as
`python -m moe_fairseq.experiments.gpu_check_fairseq`; --help for its usage)."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.gpu_check_fairseq import cli_main

if __name__ == "__main__":
    cli_main()
