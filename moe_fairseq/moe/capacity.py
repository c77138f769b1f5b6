"""Expert capacity: how many (token, slot) assignments one expert accepts per step.

Priority follows GShard / fairseq: every token's first choice is served before any token's
second choice, and within a slot earlier tokens win.  Positions are computed with a cumulative
sum over a (k*S, E) count matrix, which is O(S k E) integers -- never the S x E x C one-hot
dispatch tensor of the einsum formulation.
"""
import math

import torch
import torch.nn.functional as F
from .errors import MoEUsageError


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """C = k * ceil(cf * S / E): Switch's ceil(cf*S/E) for k=1, GShard's 2*ceil(S/E) for k=2, cf=1."""
    if capacity_factor <= 0:
        raise MoEUsageError(f"capacity_factor must be > 0 (got {capacity_factor}); use dropless routing instead")
    return k * math.ceil(capacity_factor * num_tokens / num_experts)


def apply_capacity(expert_index: torch.Tensor, keep: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Return `keep` with the assignments past each expert's capacity switched off.

    expert_index, keep: (S, k).  Slots already not kept do not use capacity.
    """
    flat_e = expert_index.t().reshape(-1)  # slot-major order: all first choices, then seconds
    flat_keep = keep.t().reshape(-1)
    counts = F.one_hot(flat_e, num_experts) * flat_keep.unsqueeze(1)
    position = (torch.cumsum(counts, dim=0) - 1).gather(1, flat_e.unsqueeze(1)).squeeze(1)
    flat_keep = flat_keep & (position < capacity)
    return flat_keep.view(keep.shape[1], keep.shape[0]).t()
