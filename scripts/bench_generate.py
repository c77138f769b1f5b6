#!/usr/bin/env python
"""Decoding speed: fairseq's SequenceGenerator on a test set, MoE against its dense twin.

The command line of moe_fairseq/experiments/bench_generate.py (the same as
`python -m moe_fairseq.experiments.bench_generate`; --help for its usage)."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.bench_generate import cli_main

if __name__ == "__main__":
    cli_main()
