"""Index-based dispatch and combine: cost linear in tokens, no S x E x C mask.

plan:     stable sort of the kept slots by expert id, and tokens per expert;
dispatch: gather the token rows in that order (one contiguous block per expert);
combine:  gate-weighted scatter-add of the expert outputs back to their tokens.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from .comm import HostCounts, host_counts
from .counting import histogram


@dataclass
class DispatchPlan:
    token_index: torch.Tensor  # (N,) source row of each dispatched slot, grouped by expert
    gate: torch.Tensor  # (N,) combine weight of each dispatched slot
    counts: torch.Tensor  # (E,) slots per expert, on the device
    counts_list: Optional[List[int]]  # the same on the host (split sizes for the GEMMs and the
    # all-to-all), or None when the caller said every slot is kept and needs no host copy
    host: Optional[HostCounts] = None  # everything read on the host with counts_list (one transfer)


def plan_dispatch(expert_index: torch.Tensor, keep: torch.Tensor, gate: torch.Tensor,
                  num_experts: int, num_kept: Optional[int] = None,
                  read_counts: Callable[[torch.Tensor], HostCounts] = host_counts) -> DispatchPlan:
    """num_kept: the caller knows every slot is kept (num_kept = S * k): then nothing is read
    on the host.  read_counts: how the counts reach the host (a communicator's read_counts,
    which for expert parallelism exchanges them with the other ranks in the same transfer)."""
    k = expert_index.shape[1]
    if num_kept is not None:
        sorted_e, order = torch.sort(expert_index.reshape(-1), stable=True)
        counts = histogram(sorted_e, num_experts)
        return DispatchPlan(order // k, gate.reshape(-1)[order], counts, None)
    # Dropped slots get the sentinel expert id E, which sorts after every real expert, so one
    # stable sort both groups the kept slots and pushes the dropped ones to the end.
    flat_e = torch.where(keep, expert_index, torch.full_like(expert_index, num_experts)).reshape(-1)
    sorted_e, order = torch.sort(flat_e, stable=True)
    counts = histogram(sorted_e, num_experts + 1)[:num_experts]
    host = read_counts(counts)  # the one host sync: split sizes must be known on the host
    n = sum(host.sent)
    slot = order[:n]
    return DispatchPlan(slot // k, gate.reshape(-1)[slot], counts, host.sent, host)


def dispatch(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    return x.index_select(0, plan.token_index)


def combine(expert_out: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """Sum of gate * expert output per token, in at least fp32 whatever the experts' dtype: the
    gate (fp32 from the router) is not rounded to half precision, a token's k contributions are
    added without rounding in between, and the router's gradient d loss / d gate (a dot product
    of expert output and output gradient) is accumulated in fp32.  The caller casts the result
    back to the residual stream's dtype."""
    dtype = torch.promote_types(expert_out.dtype, torch.float32)
    weighted = expert_out.to(dtype) * plan.gate.to(dtype).unsqueeze(1)
    out = expert_out.new_zeros(num_tokens, expert_out.shape[1], dtype=dtype)
    return out.index_add(0, plan.token_index, weighted)
