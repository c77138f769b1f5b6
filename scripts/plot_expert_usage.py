#!/usr/bin/env python
"""Expert usage of a MoE run: tokens per expert per layer over training, and per language.

The command line of moe_fairseq/experiments/plot_expert_usage.py (the same as
`python -m moe_fairseq.experiments.plot_expert_usage`; --help for its usage)."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.plot_expert_usage import cli_main

if __name__ == "__main__":
    cli_main()
