#!/usr/bin/env python
"""Records, BLEU at equal wall-clock, and the report of the Multi30k study (scripts/run_study.sh).

The command line of moe_fairseq/experiments/study_report.py (the same as
`python -m moe_fairseq.experiments.study_report`; --help for its usage)."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.study_report import cli_main

if __name__ == "__main__":
    cli_main()
