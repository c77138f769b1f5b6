"""The communication step between dispatch and the experts.

A MoE layer sorts its tokens by global expert id and hands them to a communicator, which
returns the rows its local experts must process (grouped by local expert) and later brings the
outputs back in the original order.  `LocalComm` is the single-process case (all experts are
local, nothing moves); the expert-parallel all-to-all implements the same two methods.
"""
from typing import Any, List, Tuple

import torch


class LocalComm:
    world_size = 1
    rank = 0

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.num_local_experts = num_experts

    def local_expert_ids(self) -> List[int]:
        return list(range(self.num_experts))

    def exchange(self, x: torch.Tensor, counts: torch.Tensor, counts_list: List[int]) -> Tuple[torch.Tensor, List[int], Any]:
        return x, counts_list, None

    def exchange_back(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        return y

    def remote_rows(self, counts: torch.Tensor) -> torch.Tensor:
        """Rows of this dispatch that leave the rank (0 here): for the a2a volume statistic."""
        return counts.new_zeros(())
