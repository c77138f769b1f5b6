"""SMoE-Dropout's frozen random router (Chen et al., ICLR 2023)."""
import math

import torch

from ..aux_mode import AuxMode
from ..k_schedule import KSchedule
from .base import Router, Routing, fields_at_most, fp32_logits
from .registry import register_router


@register_router("random")
class RandomRouter(Router):
    """A randomly initialised linear router that is never trained.

    The weight is a registered *buffer*: it is saved in the checkpoint (inference uses the same
    router), moved with .to(), but is not a parameter, so no optimizer can change it and it
    costs no gradient.  k follows `schedule(num_updates)` in training; in evaluation it is the
    schedule's k_max unless `eval_k` overrides it (self-slimmable inference, any k up to E).
    Softmax is over the k chosen logits only; there is no balance loss and no noise.
    """

    eval_keeps_all_slots = True

    variable_k = True
    restrictable = True
    k_flag = "--moe-top-k-max"
    frozen_tensors = ("weight",)

    def __init__(self, model_dim, num_experts, schedule: KSchedule, capacity_factor=None,
                 eval_capacity_factor=None, eval_k=None, generator=None):
        super().__init__(model_dim, num_experts, schedule.k_max, capacity_factor, eval_capacity_factor, eval_k)
        bound = 1.0 / math.sqrt(model_dim)  # nn.Linear's default init, as the reference code
        weight = torch.empty(num_experts, model_dim).uniform_(-bound, bound, generator=generator)
        self.register_buffer("weight", weight)
        self.schedule = schedule

    @classmethod
    def from_config(cls, cfg, model_dim):
        return cls(model_dim, cfg.num_experts, cfg.k_schedule(), *cfg.capacity_factors())

    @classmethod
    def config_k(cls, cfg):
        return cfg.k_schedule().k_max

    @classmethod
    def config_for_experts(cls, cfg, keep):
        return fields_at_most(cfg, keep, "top_k_max", "top_k_min", "eval_top_k")

    def training_k(self) -> int:
        return self.schedule(self.num_updates)  # self.k, the k of evaluation, is the schedule's k_max

    def forward(self, x: torch.Tensor, aux_mode: AuxMode = AuxMode.ALL) -> Routing:
        k = self.current_k()
        # The weight is a buffer without requires_grad, so it gets no gradient; but the gates
        # still depend on x, and the layer's backward must include that path (as in the
        # reference code, which freezes the gate's weight, not its input): no torch.no_grad here.
        logits = fp32_logits(x, self.routed_rows(self.weight))
        top_values, expert_index = logits.topk(k, dim=1)
        gates = torch.softmax(top_values, dim=1)
        keep, dropped = self.limit_capacity(expert_index, None, k)
        probs = torch.softmax(logits, dim=-1) if aux_mode.stats else None  # statistics only
        return Routing(expert_index, gates if keep is None else gates * keep, keep, probs, {}, dropped)
