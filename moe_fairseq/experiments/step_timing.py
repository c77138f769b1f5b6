"""Timing of training steps for scripts/calibrate_network.py: the time spent inside the
all-to-alls, and a schedule that interleaves Gating Dropout settings update by update.

Interleaving (rather than one run per setting) puts every setting under the same machine load:
on a shared machine the load drifts over minutes, and a setting timed in a quiet minute would
look faster.  The schedule is a pure function of the update number, so every rank switches at
the same update (the drop decisions themselves are keyed on (seed, update, layer), as in
training; moe/gating_dropout.py).
"""
import time
from typing import List, Tuple

import torch.distributed as dist

from ..moe.gating_dropout import gating_dropout_fires

MODES = ("gate_drop", "gate_expert_drop", "local_topk")  # every --moe-gating-dropout-mode
RATES = (0.0, 0.1, 0.3, 0.5)
SETTINGS: List[Tuple[str, float]] = [(mode, p) for mode in MODES for p in RATES]


def setting_for_update(update: int, warmup: int, block: int) -> Tuple[str, float]:
    """(mode, p) timed at `update`: p = 0 during the warm-up, then blocks of `block` updates
    per setting in round-robin; each cycle over the settings starts one setting later, so no
    setting always follows the same one."""
    if update < warmup:
        return SETTINGS[0]
    index = (update - warmup) // block
    cycle = index // len(SETTINGS)
    return SETTINGS[(index + cycle) % len(SETTINGS)]


class CollectiveTimer:
    """Wraps torch.distributed.all_to_all_single: calls, bytes of the inputs and seconds spent
    inside (waiting for the slower peer included: that is what the step pays).  The MoE layers
    call it through the module attribute, so the wrapper sees every exchange, forward and
    backward, including the count exchange."""

    def __init__(self):
        self.calls, self.bytes, self.seconds = 0, 0, 0.0
        self._original = None

    def install(self) -> "CollectiveTimer":
        self._original = original = dist.all_to_all_single

        def timed(output, input, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(output, input, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
                self.bytes += input.numel() * input.element_size()

        dist.all_to_all_single = timed
        return self

    def uninstall(self) -> None:
        if self._original is not None:
            dist.all_to_all_single = self._original
            self._original = None

    def snapshot(self) -> Tuple[int, int, float]:
        return self.calls, self.bytes, self.seconds


def set_gating_dropout(layers, mode: str, p: float) -> None:
    for layer in layers:
        layer.gating_dropout, layer.gating_dropout_mode = p, mode


def dropped_layers(layers, update: int) -> int:
    """How many of `layers` skip routing at `update` (the decision the layer takes in training)."""
    return sum(gating_dropout_fires(layer.gating_dropout, layer.seed, update, layer.layer_index) for layer in layers)
