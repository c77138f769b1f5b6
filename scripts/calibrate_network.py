#!/usr/bin/env python
"""Gating Dropout on the emulated two-node cluster, measured beside the cost model's prediction.

The command line of moe_fairseq/experiments/calibrate_network.py (the same as
`python -m moe_fairseq.experiments.calibrate_network`; --help for its usage)."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.calibrate_network import cli_main

if __name__ == "__main__":
    cli_main()
