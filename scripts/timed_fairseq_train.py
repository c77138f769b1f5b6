#!/usr/bin/env python
"""fairseq-train that times every update and interleaves Gating Dropout settings (calibration).

Run it where fairseq-train would run (FAIRSEQ_TRAIN= for scripts/train_torchrun.sh); the command
line is fairseq-train's, the environment (STEP_TIMING_*) is described in
moe_fairseq/experiments/timed_fairseq_train.py."""
import _bootstrap  # noqa: F401  (this checkout's moe_fairseq first on sys.path; see scripts/_bootstrap.py)
from moe_fairseq.experiments.timed_fairseq_train import cli_main

if __name__ == "__main__":
    cli_main()
