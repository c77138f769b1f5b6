#!/usr/bin/env python
"""Memory of a stack of MoE encoder layers with and without --checkpoint-activations (CPU).

The command line of moe_fairseq/experiments/bench_checkpointing.py (the same as
`python -m moe_fairseq.experiments.bench_checkpointing`; --help for its usage)."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.bench_checkpointing import cli_main

if __name__ == "__main__":
    cli_main()
