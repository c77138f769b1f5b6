"""fairseq-train that times every update and interleaves Gating Dropout settings (calibration).

Run it where fairseq-train would run (FAIRSEQ_TRAIN= for scripts/train_torchrun.sh); the
command line is fairseq-train's.  Environment:

  STEP_TIMING_OUT     JSON-lines file per rank ({rank} is replaced): one record per update with
                      its setting, seconds, the seconds/calls/bytes of its all-to-alls and how
                      many MoE layers Gating Dropout skipped
  STEP_TIMING_WARMUP  updates at p = 0 before the schedule starts (default 3)
  STEP_TIMING_BLOCK   consecutive updates per setting (default 2)
  STEP_TIMING_FIXED_BATCH  1: every update after the first trains on the first update's batch,
                      so step times differ by setting and machine load, not by batch size
                      (Multi30k batches of --max-tokens 4096 vary by +-25% in tokens)

The model is built from the config as given (its own --moe-gating-dropout, usually 0); from the
warm-up on, every MoE layer's rate and mode follow step_timing.setting_for_update, the same on
every rank.  Unset STEP_TIMING_OUT: plain fairseq-train.
"""
import json
import os
import sys
import time

import torch

from . import step_timing


def _install(out_template: str, warmup: int, block: int, fixed_batch: bool) -> None:
    from fairseq.trainer import Trainer

    from .. import plugin  # noqa: F401  (registered now: --user-dir skips a package already imported)
    from ..moe.collect import moe_layers

    timer = step_timing.CollectiveTimer().install()
    train_step = Trainer.train_step
    rank = int(os.environ.get("RANK", 0))
    out = open(out_template.replace("{rank}", str(rank)), "a")

    first = []

    def timed_train_step(self, samples, *args, **kwargs):
        update = self.get_num_updates()
        if fixed_batch:
            first.extend([] if first else [samples])
            samples = first[0]
        layers = moe_layers(self.model)
        mode, p = step_timing.setting_for_update(update, warmup, block)
        step_timing.set_gating_dropout(layers, mode, p)
        calls, nbytes, seconds = timer.snapshot()
        t0 = time.perf_counter()
        result = train_step(self, samples, *args, **kwargs)
        elapsed = time.perf_counter() - t0
        out.write(json.dumps({"rank": rank, "update": update, "mode": mode, "p": p, "warmup": update < warmup,
                              "seconds": elapsed, "a2a_seconds": timer.seconds - seconds,
                              "a2a_calls": timer.calls - calls, "a2a_bytes": timer.bytes - nbytes,
                              "dropped_layers": step_timing.dropped_layers(layers, update),
                              "tokens": sum(int(s.get("ntokens", 0)) for s in samples if s),
                              "moe_layers": len(layers)}) + "\n")
        out.flush()
        return result

    Trainer.train_step = timed_train_step


def cli_main():
    """fairseq-train's command line (sys.argv), timed when STEP_TIMING_OUT is set."""
    torch.set_num_threads(1)
    if os.environ.get("STEP_TIMING_OUT"):
        _install(os.environ["STEP_TIMING_OUT"], int(os.environ.get("STEP_TIMING_WARMUP", 3)),
                 int(os.environ.get("STEP_TIMING_BLOCK", 2)), os.environ.get("STEP_TIMING_FIXED_BATCH") == "1")
    from fairseq_cli.train import cli_main as train_main

    sys.argv[0] = "fairseq-train"
    train_main()


if __name__ == "__main__":
    cli_main()
