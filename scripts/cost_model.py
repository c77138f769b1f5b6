#!/usr/bin/env python
"""All-to-all cost of expert parallelism on a real cluster, and what Gating Dropout saves.

The command line of moe_fairseq/experiments/cost_model.py (the same as
`python -m moe_fairseq.experiments.cost_model`; --help for its usage)."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.cost_model import cli_main

if __name__ == "__main__":
    cli_main()
