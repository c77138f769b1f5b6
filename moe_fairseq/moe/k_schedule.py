"""SMoE-Dropout's curriculum on the number of active experts k as a function of the update."""
import math
from .errors import MoEUsageError

SCHEDULES = ("fixed", "linear", "cosine", "exponential")


def _round_half_up(x: float) -> int:
    # Python's round() rounds half to even; a schedule should not stall on even numbers.
    return int(math.floor(x + 0.5))


class KSchedule:
    """k(t) from k_min to k_max over `steps` updates.

    linear:      clip(round((k_max - k_min) * t / T) + k_min, k_min, k_max)  (the paper's rule)
    cosine:      k_min + (k_max - k_min) * (1 - cos(pi * t / T)) / 2, rounded
    exponential: k_min * (k_max / k_min) ** (t / T), rounded
    fixed:       k_max for every t
    """

    def __init__(self, k_min: int, k_max: int, steps: int, mode: str = "linear"):
        if mode not in SCHEDULES:
            raise MoEUsageError(f"--moe-top-k-schedule must be one of {', '.join(SCHEDULES)} (got {mode!r})")
        if k_min < 1:
            raise MoEUsageError(f"--moe-top-k-min must be >= 1 (got {k_min})")
        if k_min > k_max:
            raise MoEUsageError(f"--moe-top-k-min ({k_min}) must not exceed --moe-top-k-max ({k_max})")
        if mode != "fixed" and steps <= 0:
            raise MoEUsageError(f"--moe-top-k-schedule-steps must be > 0 for the {mode} schedule (got {steps})")
        self.k_min, self.k_max, self.steps, self.mode = k_min, k_max, steps, mode

    def __call__(self, t: int) -> int:
        if self.mode == "fixed":
            return self.k_max
        frac = min(max(t, 0) / self.steps, 1.0)
        span = self.k_max - self.k_min
        if self.mode == "linear":
            k = _round_half_up(span * t / self.steps) + self.k_min
        elif self.mode == "cosine":
            k = _round_half_up(self.k_min + span * (1 - math.cos(math.pi * frac)) / 2)
        else:
            k = _round_half_up(self.k_min * (self.k_max / self.k_min) ** frac)
        return min(max(k, self.k_min), self.k_max)
