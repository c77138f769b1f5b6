"""A router in one file with one decorator: what adding a router to moe_fairseq takes (used by
tests/test_router_registry.py; a real one goes in moe_fairseq/moe/routers/ and is imported in
that package's __init__)."""
import torch

from moe_fairseq.moe.aux_mode import AuxMode
from moe_fairseq.moe.routers import Router, Routing, register_router


@register_router("toy_round_robin")
class RoundRobinRouter(Router):
    """Token s goes to expert s mod E with gate 1: no parameters, no loss (so it computes the
    same in every aux_mode; a router with losses returns them only when aux_mode.losses)."""

    @classmethod
    def from_config(cls, cfg, model_dim):
        return cls(model_dim, cfg.num_experts, 1, *cfg.capacity_factors())

    @classmethod
    def config_k(cls, cfg):  # what MoEConfig.validate checks against --moe-expert-count
        return 1

    def forward(self, x: torch.Tensor, aux_mode: AuxMode = AuxMode.ALL) -> Routing:
        expert_index = (torch.arange(x.shape[0], device=x.device) % self.num_experts).unsqueeze(1)
        keep, dropped = self.limit_capacity(expert_index, torch.ones_like(expert_index, dtype=torch.bool), 1)
        return Routing(expert_index, keep.float(), keep, None, {}, dropped)
