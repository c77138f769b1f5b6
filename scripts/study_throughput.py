#!/usr/bin/env python
"""Training speed of the study's configs, side by side (what equal wall-clock rests on).

The command line of moe_fairseq/experiments/study_throughput.py (the same as
`python -m moe_fairseq.experiments.study_throughput`; --help for its usage)."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.study_throughput import cli_main

if __name__ == "__main__":
    cli_main()
