"""The learned softmax router shared by top1 (Switch) and top2 (GShard)."""
import torch

from ..aux_mode import AuxMode
from ..losses import router_z_loss
from .base import Router, fp32_logits


class SoftmaxRouter(Router):
    """A linear map M -> E (`wg`, no bias), optional multiplicative input jitter in training,
    fp32 logits and softmax, and the balance loss (`balance_loss`, set by the subclass) and
    router z-loss, each weighted and left out when its weight is 0."""

    balance_loss = None  # f(probs, top1) -> unweighted loss
    default_capacity_factors = (1.0, 2.0)  # they drop tokens past capacity by default, as in their papers
    eval_keeps_all_slots = True
    restrictable = True

    def __init__(self, model_dim, num_experts, k, capacity_factor, eval_capacity_factor,
                 balance_loss_weight=0.01, z_loss_weight=0.0, jitter_eps=0.0):
        super().__init__(model_dim, num_experts, k, capacity_factor, eval_capacity_factor)
        self.wg = torch.nn.Linear(model_dim, num_experts, bias=False)
        self.balance_loss_weight = balance_loss_weight
        self.z_loss_weight = z_loss_weight
        self.jitter_eps = jitter_eps

    def logits_and_probs(self, x: torch.Tensor):
        if self.training and self.jitter_eps > 0:
            # Jitter the router's input only (Switch): the experts see the clean x.
            x = x * torch.empty_like(x).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
        logits = fp32_logits(x, self.routed_rows(self.wg.weight))
        return logits, torch.softmax(logits, dim=-1)

    def aux_losses(self, logits, probs, top1, aux_mode: AuxMode):
        """The weighted losses when aux_mode asks for them; top1: each token's first expert,
        (S,) or (S, 1)."""
        losses = {}
        if not aux_mode.losses:
            return losses
        if self.balance_loss_weight > 0:
            losses["balance"] = self.balance_loss_weight * type(self).balance_loss(probs, top1)
        if self.z_loss_weight > 0:
            losses["z"] = self.z_loss_weight * router_z_loss(logits)
        return losses
