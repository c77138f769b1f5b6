"""Gating Dropout (Liu et al., ICML 2022): the per-step, per-layer decision to skip the router.

Every rank of an expert-parallel group must take the same decision or the all-to-all calls
mismatch and training hangs.  fairseq's NLLB branch has rank 0 draw and broadcast it on every
layer call; here the decision is a pure function of (seed, update number, layer index), so all
ranks agree with no communication at all, and a resumed run repeats the same decisions.
"""
from .errors import MoEUsageError

MODES = ("gate_drop", "gate_expert_drop")
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, update: int, layer: int) -> float:
    """A uniform number in [0, 1) keyed on (seed, update, layer); identical in every process."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (update & _MASK64))
    h = _splitmix64(h ^ (layer & _MASK64))
    return (h >> 11) * (1.0 / (1 << 53))


def gating_dropout_fires(p: float, seed: int, update: int, layer: int) -> bool:
    return p > 0 and uniform(seed, update, layer) < p


def check_rate(p: float, flag: str = "--moe-gating-dropout") -> float:
    if not 0 <= p < 1:
        raise MoEUsageError(f"{flag} must be in [0, 1) (got {p})")
    return p
