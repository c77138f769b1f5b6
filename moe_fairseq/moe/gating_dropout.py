"""Gating Dropout (Liu et al., ICML 2022): the per-step, per-layer decision to route without the
all-to-all, and what a dropped step does.

Every rank of an expert-parallel group must take the same decision or the all-to-all calls
mismatch and training hangs.  fairseq's NLLB branch has rank 0 draw and broadcast it on every
layer call; here the decision is a pure function of (seed, update number, layer index), so all
ranks agree with no communication at all, and a resumed run repeats the same decisions.

What a dropped step does (MODES; MoELayer carries them out):

gate_drop         token s of a rank goes to local expert s mod L (L experts on the rank), no
                  router, no gate, no all-to-all, no auxiliary loss (the paper's Gate-Drop).
gate_expert_drop  the layer outputs zeros, the residual alone carries the token (Gate-Expert-Drop).
local_topk        the router still runs, but only over the rank's own experts: with expert
                  parallelism rank r holds experts [r L, (r + 1) L) (with replicated experts,
                  R ranks per expert, L = 1 and the expert is r // R).  For each token the router
                  computes its logits over those L experts alone (= all logits with the other
                  experts masked to -inf), its usual softmax (or noisy logits), its usual top-k of
                  them (top1: argmax; top2: argmax, then the sampled or greedy second choice
                  among the remaining local experts; noisy_topk / random: the k largest), and its
                  usual gates and renormalisation over the restricted set (top1: the restricted
                  softmax probability; top2: the two restricted probabilities renormalised;
                  noisy_topk / random: softmax over the k chosen logits).  Capacity (unless
                  dropless) is C = k * ceil(cf * S / L), over the L local experts, with the usual
                  priority.  No all-to-all: every slot stays on the rank, the same bytes saved as
                  gate_drop, while the router is still trained through the gates.  Training-time
                  randomness (top2's Gumbel sampling and random policy, noisy_topk's noise,
                  --moe-jitter-eps) acts as on a routed step: the step is a training step whose
                  choice is restricted, not a different router.  Auxiliary losses: the router's
                  own, computed over the restricted routing as if the layer had only the L local
                  experts (balance loss with L in place of E, z-loss over the L logits), at the
                  usual weights: it keeps the balancing pressure on the experts this step
                  dispatches to (their capacity is shared over L), and at its minimum (balanced)
                  it has the value of a balanced routed step, so dropped and routed steps weigh
                  alike.  Statistics are logged as for gate_drop: moe_gating_dropped = 1, the
                  load over all E experts (zero off the rank), no all-to-all bytes; the entropy
                  is that of the restricted distribution.  k must not exceed L (refused when the
                  layer is built); the random router's k schedule applies as usual, bounded by
                  its k_max (--moe-top-k-max).  With L = 1 (top1 with one expert per rank, or
                  replicated experts) every token goes to that expert with gate 1: the step then
                  trains the router through its z-loss only (a balance loss over one expert is
                  constant).  With one process every expert is local (L = E):
                  a dropped step is then exactly a routed step (same routing, gates, losses and
                  random draws); only moe_gating_dropped records that the decision fired.
"""
from .errors import MoEUsageError

MODES = ("gate_drop", "gate_expert_drop", "local_topk")
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


def check_local_topk(router, num_local: int) -> None:
    """local_topk routes each token to k of the rank's L experts: the router must support a
    restriction (Router.restrictable) and its largest training k must not exceed L.  (The
    flags' version of this rule is MoEConfig's: validate and check_world_size.)"""
    if not getattr(router, "restrictable", False):
        raise ValueError(f"gating_dropout_mode local_topk needs a restrictable router, not {type(router).__name__}")
    if router.k > num_local:
        raise ValueError(f"gating_dropout_mode local_topk: the router's k={router.k} exceeds the rank's "
                         f"{num_local} local experts")
