#!/usr/bin/env python
"""Our MoE layer against DeepSpeed-MoE and torchtitan's MoE, paired and interleaved.

The command line of moe_fairseq/experiments/bench_moe_peers.py (the same as
`python -m moe_fairseq.experiments.bench_moe_peers`; --help for its usage)."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.bench_moe_peers import cli_main

if __name__ == "__main__":
    cli_main()
