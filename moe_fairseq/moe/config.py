"""All options of a MoE layer in one place: one dataclass field per option, carrying its
command-line flag, help text and (where it differs from the library's) the flag's default.

The fairseq side generates the flags, their defaults and the mapping from fairseq's args from
these fields (models/moe_args.py), so adding an option is adding one field here (see
docs/ARCHITECTURE.md).  The config is validated once, in `validate()`, with the flag's name in
every error; the layer's constructors check only their own arguments.
"""
from dataclasses import MISSING, dataclass, field, fields
from typing import Callable, Optional

from .errors import MoEUsageError
from .gating_dropout import MODES as GATING_DROPOUT_MODES
from .gating_dropout import check_rate
from .k_schedule import SCHEDULES, KSchedule
from .routers import ROUTERS, SECOND_EXPERT_POLICIES, build_router
from .routers.base import check_capacity_factor


def flag_dest(flag: str) -> str:
    """The attribute argparse stores a flag in: --moe-expert-count -> moe_expert_count."""
    return flag.lstrip("-").replace("-", "_")


def dest_flag(dest: str) -> str:
    """The flag of an attribute, the inverse of flag_dest: moe_expert_count -> --moe-expert-count."""
    return "--" + dest.replace("_", "-")


def option(default, flag: Optional[str] = None, help: str = "", *, arg_default=MISSING, choices=None,
           check: Optional[Callable] = None, metavar: Optional[str] = None, inherit: Optional[str] = None,
           scope: str = "model", dest: Optional[str] = None):
    """A dataclass field that is also a command-line option.

    flag, help, metavar: of the flag (type and action follow the field's annotation);
    arg_default: the flag's default when it is not the field's (e.g. --moe-expert-count is 0,
      a dense model, while a MoEConfig has 8 experts); None means "not given", see inherit;
    inherit: the fairseq option whose value is used when the flag is not given;
    choices, check: what validate() enforces (check(value, flag) raises MoEUsageError);
    scope: "model" (the model's add_args) or "task" (read at generation, so the task defines it);
    dest: the attribute in fairseq's args (default: from the flag; a field without a flag
      reads fairseq's own option, e.g. seed).
    """
    if dest is None and flag is not None:
        dest = flag_dest(flag)
    return field(default=default, metadata=dict(
        flag=flag, help=help, arg_default=default if arg_default is MISSING else arg_default, choices=choices,
        check=check, metavar=metavar, inherit=inherit, scope=scope, dest=dest))


def at_least(minimum):
    def check(value, flag):
        if value < minimum:
            raise MoEUsageError(f"{flag} must be >= {minimum} (got {value})")

    return check


@dataclass
class MoEConfig:
    num_experts: int = option(
        8, "--moe-expert-count", "experts per MoE layer (in total, over all ranks); 0 = dense transformer",
        arg_default=0, check=at_least(1), metavar="E")
    router: str = option(
        "top2", "--moe-router",
        "top1 (Switch), top2 (GShard), noisy_topk (Shazeer 2017), random (SMoE-Dropout, frozen)", choices=ROUTERS)
    top_k: int = option(2, "--moe-top-k", "experts per token for noisy_topk", metavar="K")
    capacity_factor: Optional[float] = option(  # None: the router's default
        None, "--moe-capacity-factor",
        "training capacity factor: C = k * ceil(cf * S / E) (default 1.0 for top1/top2, "
        "dropless for noisy_topk/random)")
    eval_capacity_factor: Optional[float] = option(
        None, "--moe-eval-capacity-factor", "capacity factor in evaluation (default 2.0)")
    dropless: bool = option(False, "--moe-dropless", "no capacity limit: never drop a token")
    second_expert_policy: str = option(
        "sampling", "--moe-second-expert-policy", "top2's second expert", choices=SECOND_EXPERT_POLICIES)
    normalize_gate_prob_before_dropping: bool = option(
        False, "--moe-normalize-gate-prob-before-dropping",
        "top2: renormalise the two gates before capacity dropping (default: after)")
    gate_loss_weight: float = option(
        0.01, "--moe-gate-loss-wt", "weight of the Switch/GShard balance loss (0.01)", check=at_least(0))
    z_loss_weight: float = option(0.0, "--moe-z-loss-wt", "weight of the router z-loss (0 = off)", check=at_least(0))
    importance_loss_weight: float = option(
        0.01, "--moe-importance-loss-wt", "noisy_topk importance loss weight (0.01)", check=at_least(0))
    load_loss_weight: float = option(
        0.01, "--moe-load-loss-wt", "noisy_topk load loss weight (0.01)", check=at_least(0))
    jitter_eps: float = option(
        0.0, "--moe-jitter-eps", "multiplicative router-input jitter in training (0 = off)", check=at_least(0))
    expert_dropout: float = option(
        0.0, "--moe-expert-dropout", "dropout inside the experts' hidden layer (default: --activation-dropout)",
        arg_default=None, inherit="activation_dropout", check=check_rate)
    gating_dropout: float = option(
        0.0, "--moe-gating-dropout", "Gating Dropout rate in [0, 1): probability a MoE layer skips routing for a step",
        arg_default=None, check=check_rate, metavar="P")
    gating_dropout_mode: str = option(
        "gate_drop", "--moe-gating-dropout-mode",
        "gate_drop: tokens go to a local expert; gate_expert_drop: the layer is skipped; local_topk: the router's "
        "top-k among this rank's experts", choices=GATING_DROPOUT_MODES)
    top_k_min: int = option(1, "--moe-top-k-min", "random router: k at update 0 (1)")
    top_k_max: Optional[int] = option(  # None: all experts
        None, "--moe-top-k-max", "random router: final k (default: all experts)")
    top_k_schedule: str = option(
        "linear", "--moe-top-k-schedule", "random router: k schedule (linear)", choices=SCHEDULES)
    top_k_schedule_steps: int = option(
        1000, "--moe-top-k-schedule-steps", "random router: updates to reach k_max (1000)")
    eval_top_k: Optional[int] = option(
        None, "--moe-eval-top-k", "experts per token at evaluation/generation for the noisy_topk and random routers "
        "(self-slimmable inference); default: the trained k", metavar="K", scope="task")
    seed: int = option(1, dest="seed")  # fairseq's --seed: the Gating Dropout decisions and expert init

    def validate(self):
        for f in fields(self):
            value, flag, meta = getattr(self, f.name), f.metadata.get("flag"), f.metadata
            if meta.get("choices") is not None and value not in meta["choices"]:
                raise MoEUsageError(f"{flag} must be one of {', '.join(meta['choices'])} (got {value!r})")
            if meta.get("check") is not None and value is not None:
                meta["check"](value, flag)
        self.capacity_factors()  # the factors that apply once the router's defaults are filled in
        # The router's constructor checks its own arguments (k against E, ...): building a
        # throwaway one runs exactly those checks, so no router's rule is written twice.
        self.build_router(1)
        return self

    def capacity_factors(self):
        if self.dropless:
            return None, None
        default_train, default_eval = ROUTERS[self.router].default_capacity_factors
        train = self.capacity_factor if self.capacity_factor is not None else default_train
        evaluation = self.eval_capacity_factor if self.eval_capacity_factor is not None else default_eval
        for name, cf in (("--moe-capacity-factor", train), ("--moe-eval-capacity-factor", evaluation)):
            check_capacity_factor(cf, name)
        return train, evaluation

    def k_schedule(self) -> KSchedule:
        k_max = self.top_k_max if self.top_k_max is not None else self.num_experts
        if k_max > self.num_experts:
            raise MoEUsageError(f"--moe-top-k-max must be <= --moe-expert-count={self.num_experts} (got {k_max})")
        return KSchedule(self.top_k_min, k_max, self.top_k_schedule_steps, self.top_k_schedule)

    def build_router(self, model_dim: int):
        return build_router(self, model_dim)
