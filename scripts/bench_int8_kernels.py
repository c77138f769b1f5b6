#!/usr/bin/env python
"""The int8 CPU kernels torch ships, against fp32, on the GEMM shapes of a Multi30k decoder step.

The command line of moe_fairseq/experiments/bench_int8_kernels.py (the same as
`python -m moe_fairseq.experiments.bench_int8_kernels`; --help for its usage)."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.bench_int8_kernels import cli_main

if __name__ == "__main__":
    cli_main()
