"""Noisy top-k gating with importance and load losses (Shazeer et al., ICLR 2017)."""
import torch
import torch.nn.functional as F

from ..aux_mode import AuxMode
from ..losses import cv_squared
from .base import Router, Routing, fields_at_most, fp32_logits
from .registry import register_router


@register_router("noisy_topk")
class NoisyTopKRouter(Router):
    """H(x) = x W_g + n * (softplus(x W_noise) + noise_eps), n ~ N(0, 1) in training only;
    G(x) = softmax over the k largest entries of H(x).

    W_g and W_noise start at zero (the paper's appendix), so all experts start equal and the
    noise alone breaks ties.  noise_eps (1e-2, as in the authors' code) keeps the load loss's
    normal CDF finite while W_noise is still zero.
    """

    eval_keeps_all_slots = True

    variable_k = True
    restrictable = True

    def __init__(self, model_dim, num_experts, k=2, capacity_factor=None, eval_capacity_factor=None,
                 importance_loss_weight=0.01, load_loss_weight=0.01, noise_eps=1e-2, eval_k=None):
        super().__init__(model_dim, num_experts, k, capacity_factor, eval_capacity_factor, eval_k)
        self.w_gate = torch.nn.Parameter(torch.zeros(num_experts, model_dim))
        self.w_noise = torch.nn.Parameter(torch.zeros(num_experts, model_dim))
        self.importance_loss_weight = importance_loss_weight
        self.load_loss_weight = load_loss_weight
        self.noise_eps = noise_eps

    @classmethod
    def from_config(cls, cfg, model_dim):
        return cls(model_dim, cfg.num_experts, cfg.top_k, *cfg.capacity_factors(),
                   importance_loss_weight=cfg.importance_loss_weight, load_loss_weight=cfg.load_loss_weight)

    @classmethod
    def config_for_experts(cls, cfg, keep):
        return fields_at_most(cfg, keep, "top_k", "eval_top_k")

    def forward(self, x: torch.Tensor, aux_mode: AuxMode = AuxMode.ALL) -> Routing:
        k, num_experts = self.current_k(), self.routed_experts()
        clean = fp32_logits(x, self.routed_rows(self.w_gate))
        noisy_training = self.training
        if noisy_training:
            sigma = F.softplus(fp32_logits(x, self.routed_rows(self.w_noise))) + self.noise_eps
            logits = clean + torch.randn_like(clean) * sigma
        else:
            logits = clean
        top_values, top_index = logits.topk(min(k + 1, num_experts), dim=1)
        expert_index = top_index[:, :k]
        gates = torch.softmax(top_values[:, :k], dim=1)
        keep, dropped = self.limit_capacity(expert_index, None, k)
        if keep is not None:
            gates = gates * keep
        losses = {}
        if not aux_mode.losses:
            return Routing(expert_index, gates, keep, None, losses, dropped)
        dense_gates = torch.zeros_like(clean).scatter(1, expert_index, gates)
        if self.importance_loss_weight > 0:
            losses["importance"] = self.importance_loss_weight * cv_squared(dense_gates.sum(0))
        if self.load_loss_weight > 0:
            if noisy_training and k < num_experts:
                load = self._smooth_load(clean, logits, sigma, top_values, k)
            else:
                load = (dense_gates > 0).float().sum(0)
            losses["load"] = self.load_loss_weight * cv_squared(load)
        probs = torch.softmax(clean, dim=-1) if aux_mode.stats else None  # statistics only
        return Routing(expert_index, gates, keep, probs, losses, dropped)

    @staticmethod
    def _smooth_load(clean, noisy, sigma, top_values, k):
        """Load_i = sum_x Phi((clean_i - kth_excluding(H, k, i)) / sigma_i).

        kth_excluding: for an expert inside the top k, the k-th largest of the others is the
        (k+1)-th overall; for one outside, it is the k-th overall.
        """
        threshold_in = top_values[:, k:k + 1]
        threshold_out = top_values[:, k - 1:k]
        is_in = noisy > threshold_in
        # The standard normal CDF as a plain op: torch.distributions.Normal.cdf validates its
        # argument by default, a host sync (on CUDA) per call.
        prob_in = torch.special.ndtr((clean - threshold_in) / sigma)
        prob_out = torch.special.ndtr((clean - threshold_out) / sigma)
        return torch.where(is_in, prob_in, prob_out).sum(0)
