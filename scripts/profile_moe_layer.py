#!/usr/bin/env python
"""Where one forward + backward of the MoE layer spends its time, by stage (torch.profiler).

The command line of moe_fairseq/experiments/profile_moe_layer.py (the same as
`python -m moe_fairseq.experiments.profile_moe_layer`; --help for its usage)."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.profile_moe_layer import cli_main

if __name__ == "__main__":
    cli_main()
