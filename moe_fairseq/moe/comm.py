"""The communication step between dispatch and the experts.

A MoE layer sorts its tokens by global expert id and hands them to a communicator, which
returns the rows its local experts must process (grouped by local expert) and later brings the
outputs back in the original order.  `LocalComm` is the single-process case (all experts are
local, nothing moves); the expert-parallel all-to-all implements the same methods.

One call of a layer reads its split sizes on the host exactly once: `read_counts` turns the
per-expert counts (on the device) into the host lists everything after it needs (how many rows
to gather, the GEMM splits, for expert parallelism the all-to-all's split sizes), so that the
layer's forward and backward need no other read-back.
"""
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch


@dataclass
class HostCounts:
    """What a layer call reads on the host (one transfer): `sent[e]` rows this rank dispatches
    to global expert e; with expert parallelism also `received[s][l]` rows it receives from
    rank s for its local expert l (and `received_t`, the same (W, L) matrix on the device)."""

    sent: List[int]
    received: Optional[List[List[int]]] = None
    received_t: Optional[torch.Tensor] = None


def host_counts(counts: torch.Tensor) -> HostCounts:
    """The single-process read: the counts themselves."""
    return HostCounts(counts.tolist())


class LocalComm:
    world_size = 1
    rank = 0

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.num_local_experts = num_experts

    def local_expert_ids(self) -> List[int]:
        return list(range(self.num_experts))

    def read_counts(self, counts: torch.Tensor) -> HostCounts:
        return host_counts(counts)

    def exchange(self, x: torch.Tensor, counts: torch.Tensor,
                 host: Optional[HostCounts]) -> Tuple[torch.Tensor, Any, Optional[torch.Tensor], Any]:
        """(rows for the local experts, their counts as given to FFNExperts (a host list, or the
        device tensor when nothing was read on the host), the counts on the device, handle)."""
        if host is None:
            return x, counts, counts, None
        return x, host.sent, counts, None

    def exchange_back(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        return y

    def remote_rows(self, counts: torch.Tensor) -> torch.Tensor:
        """Rows of this dispatch that leave the rank (0 here): for the a2a volume statistic."""
        return counts.new_zeros(())
