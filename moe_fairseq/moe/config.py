"""All options of a MoE layer in one place, validated once, with fairseq's flag names in errors."""
from dataclasses import dataclass
from typing import Optional

from .gating_dropout import MODES as GATING_DROPOUT_MODES
from .gating_dropout import check_rate
from .k_schedule import SCHEDULES, KSchedule
from .routers import ROUTERS, SECOND_EXPERT_POLICIES, build_router
from .errors import MoEUsageError


@dataclass
class MoEConfig:
    num_experts: int = 8  # --moe-expert-count
    router: str = "top2"  # --moe-router
    top_k: int = 2  # --moe-top-k (noisy_topk)
    capacity_factor: Optional[float] = None  # --moe-capacity-factor (None: the router's default)
    eval_capacity_factor: Optional[float] = None  # --moe-eval-capacity-factor
    dropless: bool = False  # --moe-dropless
    second_expert_policy: str = "sampling"  # --moe-second-expert-policy
    normalize_gate_prob_before_dropping: bool = False  # --moe-normalize-gate-prob-before-dropping
    gate_loss_weight: float = 0.01  # --moe-gate-loss-wt (Switch / GShard balance loss)
    z_loss_weight: float = 0.0  # --moe-z-loss-wt
    importance_loss_weight: float = 0.01  # --moe-importance-loss-wt
    load_loss_weight: float = 0.01  # --moe-load-loss-wt
    jitter_eps: float = 0.0  # --moe-jitter-eps
    expert_dropout: float = 0.0  # --moe-expert-dropout
    gating_dropout: float = 0.0  # --moe-gating-dropout
    gating_dropout_mode: str = "gate_drop"  # --moe-gating-dropout-mode
    top_k_min: int = 1  # --moe-top-k-min
    top_k_max: Optional[int] = None  # --moe-top-k-max (None: all experts)
    top_k_schedule: str = "linear"  # --moe-top-k-schedule
    top_k_schedule_steps: int = 1000  # --moe-top-k-schedule-steps
    eval_top_k: Optional[int] = None  # --moe-eval-top-k
    seed: int = 1

    def validate(self):
        if self.router not in ROUTERS:
            raise MoEUsageError(f"--moe-router must be one of {', '.join(ROUTERS)} (got {self.router!r})")
        if self.num_experts < 1:
            raise MoEUsageError(f"--moe-expert-count must be >= 1 (got {self.num_experts})")
        if self.second_expert_policy not in SECOND_EXPERT_POLICIES:
            raise MoEUsageError(f"--moe-second-expert-policy must be one of {', '.join(SECOND_EXPERT_POLICIES)} "
                             f"(got {self.second_expert_policy!r})")
        check_rate(self.gating_dropout, "--moe-gating-dropout")
        if self.gating_dropout_mode not in GATING_DROPOUT_MODES:
            raise MoEUsageError(f"--moe-gating-dropout-mode must be one of {', '.join(GATING_DROPOUT_MODES)} "
                             f"(got {self.gating_dropout_mode!r})")
        check_rate(self.expert_dropout, "--moe-expert-dropout")
        if self.top_k_schedule not in SCHEDULES:
            raise MoEUsageError(f"--moe-top-k-schedule must be one of {', '.join(SCHEDULES)} (got {self.top_k_schedule!r})")
        for name, v in (("--moe-gate-loss-wt", self.gate_loss_weight), ("--moe-z-loss-wt", self.z_loss_weight),
                        ("--moe-importance-loss-wt", self.importance_loss_weight),
                        ("--moe-load-loss-wt", self.load_loss_weight), ("--moe-jitter-eps", self.jitter_eps)):
            if v < 0:
                raise MoEUsageError(f"{name} must be >= 0 (got {v})")
        self.capacity_factors()  # validates capacity factors
        self.build_router(1)  # validates k against E with the router's own messages
        return self

    def capacity_factors(self):
        if self.dropless:
            return None, None
        default_train, default_eval = ROUTERS[self.router].default_capacity_factors
        train = self.capacity_factor if self.capacity_factor is not None else default_train
        evaluation = self.eval_capacity_factor if self.eval_capacity_factor is not None else default_eval
        for name, cf in (("--moe-capacity-factor", train), ("--moe-eval-capacity-factor", evaluation)):
            if cf is not None and cf <= 0:
                raise MoEUsageError(f"{name} must be > 0 (got {cf}); use --moe-dropless for no capacity limit")
        return train, evaluation

    def k_schedule(self) -> KSchedule:
        k_max = self.top_k_max if self.top_k_max is not None else self.num_experts
        if k_max > self.num_experts:
            raise MoEUsageError(f"--moe-top-k-max must be <= --moe-expert-count={self.num_experts} (got {k_max})")
        return KSchedule(self.top_k_min, k_max, self.top_k_schedule_steps, self.top_k_schedule)

    def build_router(self, model_dim: int):
        return build_router(self, model_dim)
