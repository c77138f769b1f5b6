"""Expert capacity: how many (token, slot) assignments one expert accepts per step.

Priority follows GShard / fairseq: every token's first choice is served before any token's
second choice, and within a slot earlier tokens win.  A slot's position in its expert's queue is
its rank among the kept slots of that expert in this priority order, read off one stable sort of
the expert ids: O(S k log(S k)) and independent of E -- neither the (k*S, E) cumulative count
matrix of fairseq's implementation nor the S x E x C one-hot dispatch tensor of the einsum
formulation.
"""
import math

import torch
from .counting import histogram
from .errors import MoEUsageError


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """C = k * ceil(cf * S / E): Switch's ceil(cf*S/E) for k=1, GShard's 2*ceil(S/E) for k=2, cf=1."""
    if capacity_factor <= 0:
        raise MoEUsageError(f"capacity_factor must be > 0 (got {capacity_factor}); use dropless routing instead")
    # The small tolerance keeps float error from adding a slot: 1.1 * 50 / 1 is 55.000000000000007.
    return k * math.ceil(capacity_factor * num_tokens / num_experts - 1e-9)


def apply_capacity(expert_index: torch.Tensor, keep: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Return `keep` with the assignments past each expert's capacity switched off.

    expert_index, keep: (S, k).  Slots already not kept do not use capacity.
    """
    flat_e = expert_index.t().reshape(-1)  # slot-major order: all first choices, then seconds
    flat_keep = keep.t().reshape(-1).bool()
    # Slots not kept get the sentinel id E and take no place in any queue.  A stable sort keeps
    # the priority order within each expert, so a slot's position in its expert's queue is its
    # index in the sorted order minus the index where that expert's run starts.
    key = torch.where(flat_keep, flat_e, torch.full_like(flat_e, num_experts))
    sorted_key, order = torch.sort(key, stable=True)
    counts = histogram(sorted_key, num_experts + 1)
    run_start = torch.cumsum(counts, dim=0) - counts
    position_sorted = torch.arange(key.numel(), device=key.device) - run_start[sorted_key]
    kept_sorted = (position_sorted < capacity) & (sorted_key < num_experts)
    new_keep = torch.empty_like(flat_keep).index_put_((order,), kept_sorted)
    return new_keep.view(keep.shape[1], keep.shape[0]).t()
