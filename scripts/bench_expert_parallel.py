#!/usr/bin/env python
"""All-to-all volume and step time of an expert-parallel MoE layer under Gating Dropout.

The command line of moe_fairseq/experiments/bench_expert_parallel.py (the same as
`python -m moe_fairseq.experiments.bench_expert_parallel`; --help for its usage)."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.bench_expert_parallel import cli_main

if __name__ == "__main__":
    cli_main()
