"""GShard top-2 router (Lepikhin et al., 2021), with fairseq's MoE-branch options."""
import torch

from ..aux_mode import AuxMode
from ..losses import gshard_balance_loss
from .base import Routing
from .registry import register_router
from .softmax_router import SoftmaxRouter

SECOND_EXPERT_POLICIES = ("sampling", "all", "random")


@register_router("top2")
class Top2Router(SoftmaxRouter):
    """Second expert: argmax with the first masked, after Gumbel noise under `sampling`;
    under `random` it is kept only when 2 * g2 > U(0, 1).  Noise and the random policy act in
    training only, so generation is deterministic."""

    balance_loss = staticmethod(gshard_balance_loss)
    k_flag = "--moe-router top2"

    def __init__(self, model_dim, num_experts, capacity_factor=1.0, eval_capacity_factor=2.0,
                 second_expert_policy="sampling", normalize_gate_prob_before_dropping=False,
                 balance_loss_weight=0.01, z_loss_weight=0.0, jitter_eps=0.0):
        if num_experts < 2:
            raise ValueError(f"Top2Router needs num_experts >= 2 (got {num_experts})")
        super().__init__(model_dim, num_experts, 2, capacity_factor, eval_capacity_factor,
                         balance_loss_weight, z_loss_weight, jitter_eps)
        if second_expert_policy not in SECOND_EXPERT_POLICIES:
            raise ValueError(f"Top2Router: second_expert_policy must be one of {', '.join(SECOND_EXPERT_POLICIES)} "
                             f"(got {second_expert_policy!r})")
        self.second_expert_policy = second_expert_policy
        self.normalize_before_dropping = normalize_gate_prob_before_dropping

    @classmethod
    def from_config(cls, cfg, model_dim):
        return cls(model_dim, cfg.num_experts, *cfg.capacity_factors(), second_expert_policy=cfg.second_expert_policy,
                   normalize_gate_prob_before_dropping=cfg.normalize_gate_prob_before_dropping,
                   balance_loss_weight=cfg.gate_loss_weight, z_loss_weight=cfg.z_loss_weight,
                   jitter_eps=cfg.jitter_eps)

    @classmethod
    def config_k(cls, cfg):
        return 2

    @classmethod
    def config_for_experts(cls, cfg, keep):
        return {"router": "top1"} if keep == 1 else {}  # no second expert; one expert's gate is 1 in both

    def forward(self, x: torch.Tensor, aux_mode: AuxMode = AuxMode.ALL) -> Routing:
        logits, probs = self.logits_and_probs(x)
        top1 = probs.argmax(dim=-1, keepdim=True)
        noisy = logits
        if self.training and self.second_expert_policy == "sampling":
            # Gumbel(0, 1) = -log(-log(U)); the parentheses matter: unary minus binds looser than
            # .clamp_min, and clamping log(U) < 0 from below at 1e-20 would give log(-1e-20) = nan.
            u = torch.rand_like(logits).clamp_min(1e-20)
            gumbel = -torch.log((-torch.log(u)).clamp_min(1e-20))
            noisy = logits + gumbel
        top2 = noisy.scatter(1, top1, float("-inf")).argmax(dim=-1, keepdim=True)
        expert_index = torch.cat([top1, top2], dim=1)
        gates = probs.gather(1, expert_index)
        if self.normalize_before_dropping:
            gates = gates / gates.sum(dim=1, keepdim=True).clamp_min(torch.finfo(gates.dtype).eps)
        keep = None  # every slot, unless the random policy or capacity drops some
        if self.training and self.second_expert_policy == "random":
            # As fairseq's top2gating: the test 2 * g2 > U uses g2 after the optional
            # normalisation before dropping.
            keep = torch.ones_like(expert_index, dtype=torch.bool)
            keep[:, 1] = 2 * gates[:, 1] > torch.rand_like(gates[:, 1])
        keep, dropped = self.limit_capacity(expert_index, keep, 2)
        if keep is not None:
            gates = gates * keep
        if not self.normalize_before_dropping:
            gates = gates / gates.sum(dim=1, keepdim=True).clamp_min(torch.finfo(gates.dtype).eps)
        return Routing(expert_index, gates, keep, probs, self.aux_losses(logits, probs, top1, aux_mode), dropped)
