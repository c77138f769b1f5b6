#!/usr/bin/env python
"""Forward + backward time of our MoE layer against fairscale's MOELayer and the dense limit.

The command line of moe_fairseq/experiments/bench_moe_layer.py (the same as
`python -m moe_fairseq.experiments.bench_moe_layer`; --help for its usage)."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.bench_moe_layer import cli_main

if __name__ == "__main__":
    cli_main()
