"""Switch Transformer top-1 router (Fedus et al., 2021)."""
import torch

from ..aux_mode import AuxMode
from ..losses import switch_balance_loss
from .base import Routing
from .registry import register_router
from .softmax_router import SoftmaxRouter


@register_router("top1")
class Top1Router(SoftmaxRouter):
    """Expert = argmax of the fp32 softmax, gate = its probability (not renormalised)."""

    balance_loss = staticmethod(switch_balance_loss)
    k_flag = "--moe-router top1"

    def __init__(self, model_dim, num_experts, capacity_factor=1.0, eval_capacity_factor=2.0,
                 balance_loss_weight=0.01, z_loss_weight=0.0, jitter_eps=0.0):
        super().__init__(model_dim, num_experts, 1, capacity_factor, eval_capacity_factor,
                         balance_loss_weight, z_loss_weight, jitter_eps)

    @classmethod
    def from_config(cls, cfg, model_dim):
        return cls(model_dim, cfg.num_experts, *cfg.capacity_factors(), balance_loss_weight=cfg.gate_loss_weight,
                   z_loss_weight=cfg.z_loss_weight, jitter_eps=cfg.jitter_eps)

    @classmethod
    def config_k(cls, cfg):
        return 1

    def forward(self, x: torch.Tensor, aux_mode: AuxMode = AuxMode.ALL) -> Routing:
        logits, probs = self.logits_and_probs(x)
        gate, top1 = probs.max(dim=-1)
        expert_index = top1.unsqueeze(1)
        keep, dropped = self.limit_capacity(expert_index, None, 1)
        gate = gate.unsqueeze(1) if keep is None else gate.unsqueeze(1) * keep
        return Routing(expert_index, gate, keep, probs, self.aux_losses(logits, probs, top1, aux_mode), dropped)
