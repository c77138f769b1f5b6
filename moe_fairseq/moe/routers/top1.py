"""Switch Transformer top-1 router (Fedus et al., 2021)."""
import torch

from ..losses import router_z_loss, switch_balance_loss
from .base import Router, Routing, fp32_logits


class Top1Router(Router):
    def __init__(self, model_dim, num_experts, capacity_factor=1.0, eval_capacity_factor=2.0,
                 balance_loss_weight=0.01, z_loss_weight=0.0, jitter_eps=0.0):
        super().__init__(model_dim, num_experts, 1, capacity_factor, eval_capacity_factor)
        self.wg = torch.nn.Linear(model_dim, num_experts, bias=False)
        self.balance_loss_weight = balance_loss_weight
        self.z_loss_weight = z_loss_weight
        self.jitter_eps = jitter_eps

    def forward(self, x: torch.Tensor) -> Routing:
        if self.training and self.jitter_eps > 0:
            # Multiplicative jitter on the router input only (Switch); the experts see clean x.
            x = x * torch.empty_like(x).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
        logits = fp32_logits(x, self.wg.weight)
        probs = torch.softmax(logits, dim=-1)
        gate, top1 = probs.max(dim=-1)
        expert_index = top1.unsqueeze(1)
        keep, dropped = self.limit_capacity(expert_index, torch.ones_like(expert_index, dtype=torch.bool), 1)
        losses = {}
        if self.balance_loss_weight > 0:
            losses["balance"] = self.balance_loss_weight * switch_balance_loss(probs, top1)
        if self.z_loss_weight > 0:
            losses["z"] = self.z_loss_weight * router_z_loss(logits)
        return Routing(expert_index, gate.unsqueeze(1) * keep, keep, probs, losses, dropped)
