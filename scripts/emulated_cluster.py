#!/usr/bin/env python
"""N network namespaces joined by a rate-shaped link, a command run on each as one node.

The command line of moe_fairseq/experiments/emulated_cluster.py (the same as
`python -m moe_fairseq.experiments.emulated_cluster`; --help for its usage)."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.emulated_cluster import cli_main

if __name__ == "__main__":
    cli_main()
