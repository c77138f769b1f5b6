"""All options of a MoE layer in one place: one dataclass field per option, carrying its
command-line flag, help text and (where it differs from the library's) the flag's default.

The fairseq side generates the flags, their defaults and the mapping from fairseq's args from
these fields (models/moe_args.py), so adding an option is adding one field here (see
docs/ARCHITECTURE.md).  A MoEConfig is validated once, when it is made (`validate()`), with the
flag's name in every error, and trusted after: the layer's, routers' and experts' constructors
check only their own arguments, in their own names.
"""
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Dict, NamedTuple, Optional

from .errors import MoEUsageError
from .gating_dropout import MODES as GATING_DROPOUT_MODES
from .gating_dropout import check_rate
from .k_schedule import SCHEDULES, KSchedule
from .routers import ROUTERS, SECOND_EXPERT_POLICIES, build_router


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


def check_fields(options):
    """Every field's `choices` and `check` (see option), with the field's flag in the error."""
    for f in fields(options):
        value, meta = getattr(options, f.name), f.metadata
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise MoEUsageError(f"{meta['flag']} must be one of {', '.join(meta['choices'])} (got {value!r})")
        if meta.get("check") is not None and value is not None:
            meta["check"](value, meta["flag"])


def check_capacity_factor(cf: Optional[float], flag: str):
    if cf is not None and cf <= 0:
        raise MoEUsageError(f"{flag} must be > 0 (got {cf}); use --moe-dropless for no capacity limit")


def check_top_k(k: int, num_experts: int, flag: str = "--moe-top-k"):
    if not 1 <= k <= num_experts:
        raise MoEUsageError(f"{flag} must be between 1 and --moe-expert-count={num_experts} (got {k})")


def check_eval_top_k(router_cls: type, num_experts: int, k: int):
    """--moe-eval-top-k, given at training (MoEConfig) or at generation (the task's flag)."""
    if not router_cls.variable_k:
        names = [name for name, cls in ROUTERS.items() if cls.variable_k]
        raise MoEUsageError(f"--moe-eval-top-k applies to the {' and '.join(names)} routers, "
                            f"not to {router_cls.__name__}")
    check_top_k(k, num_experts, "--moe-eval-top-k")


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

    def __post_init__(self):
        # Validated here, once, and trusted after (as megablocks' Arguments): the layer,
        # routers and experts built from a MoEConfig check only their own arguments.
        self.validate()

    def validate(self):
        """Every rule on the options, each error one line naming the flag; returns self.  Runs
        at construction; call it again after changing a field."""
        check_fields(self)
        for flag, cf in zip(("--moe-capacity-factor", "--moe-eval-capacity-factor"), self.capacity_factors()):
            check_capacity_factor(cf, flag)  # the factors that apply once the router's defaults are filled in
        router = ROUTERS[self.router]
        k = router.config_k(self)  # the random router's k schedule checks its flags here
        if k > self.num_experts and router.k_flag == f"--moe-router {self.router}":  # a k no flag sets
            raise MoEUsageError(f"--moe-router {self.router} needs --moe-expert-count >= {k} (got {self.num_experts})")
        check_top_k(k, self.num_experts, router.k_flag)
        if self.eval_top_k is not None:
            check_eval_top_k(router, self.num_experts, self.eval_top_k)
        if self.gating_dropout_mode == "local_topk" and not router.restrictable:
            raise MoEUsageError(f"--moe-gating-dropout-mode local_topk needs a router that can route over a subset "
                                f"of the experts; --moe-router {self.router} cannot (use gate_drop or gate_expert_drop)")
        return self

    def check_world_size(self, world_size: int):
        """The rules that depend on the number of ranks the experts are spread over."""
        from .expert_parallel import expert_sharding

        try:
            num_local = expert_sharding(self.num_experts, world_size)[0]
        except ValueError as e:
            raise MoEUsageError(str(e)) from None
        router = ROUTERS[self.router]
        k = router.config_k(self)
        if self.gating_dropout_mode == "local_topk" and k > num_local:
            raise MoEUsageError(f"--moe-gating-dropout-mode local_topk routes each token to k={k} "
                                f"({router.k_flag}) of its rank's experts, but --moe-expert-count={self.num_experts} "
                                f"over {world_size} rank(s) leaves {num_local} per rank; use gate_drop or more experts")
        return self

    def capacity_factors(self):
        if self.dropless:
            return None, None
        default_train, default_eval = ROUTERS[self.router].default_capacity_factors
        train = self.capacity_factor if self.capacity_factor is not None else default_train
        evaluation = self.eval_capacity_factor if self.eval_capacity_factor is not None else default_eval
        return train, evaluation

    def k_schedule(self) -> KSchedule:
        k_max = self.top_k_max if self.top_k_max is not None else self.num_experts
        if k_max > self.num_experts:
            raise MoEUsageError(f"--moe-top-k-max must be <= --moe-expert-count={self.num_experts} (got {k_max})")
        return KSchedule(self.top_k_min, k_max, self.top_k_schedule_steps, self.top_k_schedule)

    def build_router(self, model_dim: int):
        return build_router(self, model_dim)


def field_dest(name: str) -> str:
    """The attribute in fairseq's args of MoEConfig's field `name` (router -> moe_router)."""
    return MoEConfig.__dataclass_fields__[name].metadata["dest"]


class Alias(NamedTuple):
    field: str  # the MoEConfig field it sets
    value: object  # a switch's value (the flag takes no argument), or None: the flag carries one
    help: str
    metavar: Optional[str] = None


# Other fairseq branches' spellings of our options.  A switch wins over the field's own flag (as
# --moe-top1-expert always meant top1); an alias carrying a value is used when the field's own
# flag is not given.
ALIASES = {
    "--moe-top1-expert": Alias("router", "top1", "fairseq moe-branch spelling of --moe-router top1"),
    "--moe-local-drop": Alias("gating_dropout", None, "fairseq nllb-branch spelling of --moe-gating-dropout with "
                                                      "gate_drop", "P"),
}


def config_values(get: Callable[[str], Any]) -> Dict[str, Any]:
    """MoEConfig's field values from fairseq's arguments, `get(dest)` returning an argument or None
    (the command line's or a checkpoint's saved one): aliases resolved, inherited options and
    defaults filled in.  The one reader of the MoE flags' values; not validated (a dense model's
    have 0 experts), MoEConfig(**values) is."""
    values = {}
    for f in fields(MoEConfig):
        meta = f.metadata
        value = get(meta["dest"])
        for flag, alias in ALIASES.items():
            if alias.field != f.name:
                continue
            given = get(flag_dest(flag))
            if alias.value is not None and given:  # a switch, given
                value = alias.value
            elif alias.value is None and value is None:  # the field's own flag not given
                value = given
        if value is None and meta["inherit"]:
            value = get(meta["inherit"])
        values[f.name] = f.default if value is None else value
    return values
