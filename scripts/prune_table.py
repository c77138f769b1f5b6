#!/usr/bin/env python
"""Language-specific expert pruning of a trained model: parameters, file size and BLEU per kept N.

The command line of moe_fairseq/experiments/prune_table.py (the same as
`python -m moe_fairseq.experiments.prune_table`; --help for its usage)."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.prune_table import cli_main

if __name__ == "__main__":
    cli_main()
