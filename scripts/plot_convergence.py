#!/usr/bin/env python
"""Validation loss and nll_loss against wall-clock time for several runs, from fairseq logs.

The command line of moe_fairseq/experiments/plot_convergence.py (the same as
`python -m moe_fairseq.experiments.plot_convergence`; --help for its usage)."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.plot_convergence import cli_main

if __name__ == "__main__":
    cli_main()
