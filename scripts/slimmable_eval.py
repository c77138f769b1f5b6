#!/usr/bin/env python
"""Self-slimmable inference of a SMoE-Dropout model: BLEU per direction as a function of k.

The command line of moe_fairseq/experiments/slimmable_eval.py (the same as
`python -m moe_fairseq.experiments.slimmable_eval`; --help for its usage)."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.slimmable_eval import cli_main

if __name__ == "__main__":
    cli_main()
