"""Command-line flags of the MoE model, and their translation into the layer library's MoEConfig.

Flag names follow fairseq's `moe`/`nllb` branches where the concept is the same
(--moe-expert-count, --moe-freq, --moe-second-expert-policy, --moe-gate-loss-wt, ...), so their
users find what they know.
"""
from ..moe.config import MoEConfig
from ..moe.gating_dropout import MODES as GATING_DROPOUT_MODES
from ..moe.k_schedule import SCHEDULES
from ..moe.routers import ROUTERS, SECOND_EXPERT_POLICIES
from ..moe.errors import MoEUsageError


def add_moe_args(parser):
    g = parser.add_argument_group("Mixture of Experts")
    g.add_argument("--moe-expert-count", type=int, metavar="E",
                   help="experts per MoE layer (in total, over all ranks); 0 = dense transformer")
    g.add_argument("--moe-freq", type=int, metavar="N",
                   help="every N-th FFN (layers i with (i+1) %% N == 0) of encoder and decoder is MoE; 0 = none")
    g.add_argument("--encoder-moe-freq", type=int, metavar="N", help="as --moe-freq, encoder only (overrides it)")
    g.add_argument("--decoder-moe-freq", type=int, metavar="N", help="as --moe-freq, decoder only (overrides it)")
    g.add_argument("--moe-router", choices=ROUTERS,
                   help="top1 (Switch), top2 (GShard), noisy_topk (Shazeer 2017), random (SMoE-Dropout, frozen)")
    g.add_argument("--moe-top1-expert", action="store_true",
                   help="fairseq moe-branch spelling of --moe-router top1")
    g.add_argument("--moe-top-k", type=int, metavar="K", help="experts per token for noisy_topk")
    g.add_argument("--moe-capacity-factor", type=float,
                   help="training capacity factor: C = k * ceil(cf * S / E) (default 1.0 for top1/top2, "
                        "dropless for noisy_topk/random)")
    g.add_argument("--moe-eval-capacity-factor", type=float, help="capacity factor in evaluation (default 2.0)")
    g.add_argument("--moe-dropless", action="store_true", help="no capacity limit: never drop a token")
    g.add_argument("--moe-second-expert-policy", choices=SECOND_EXPERT_POLICIES, help="top2's second expert")
    g.add_argument("--moe-normalize-gate-prob-before-dropping", action="store_true",
                   help="top2: renormalise the two gates before capacity dropping (default: after)")
    g.add_argument("--moe-gating-use-fp32", action="store_true",
                   help="accepted for fairseq compatibility: routers always compute in fp32")
    g.add_argument("--moe-gate-loss-wt", type=float, help="weight of the Switch/GShard balance loss (0.01)")
    g.add_argument("--moe-z-loss-wt", type=float, help="weight of the router z-loss (0 = off)")
    g.add_argument("--moe-importance-loss-wt", type=float, help="noisy_topk importance loss weight (0.01)")
    g.add_argument("--moe-load-loss-wt", type=float, help="noisy_topk load loss weight (0.01)")
    g.add_argument("--moe-jitter-eps", type=float, help="multiplicative router-input jitter in training (0 = off)")
    g.add_argument("--moe-expert-dropout", type=float,
                   help="dropout inside the experts' hidden layer (default: --activation-dropout)")
    g.add_argument("--moe-expert-ffn-dim", type=int, help="hidden size of each expert (default: the FFN dim)")
    g.add_argument("--moe-split-ffn", action="store_true",
                   help="experts of hidden size FFN/E: the parameters of one dense FFN (SMoE-Dropout)")
    g.add_argument("--moe-gating-dropout", type=float, metavar="P",
                   help="Gating Dropout rate in [0, 1): probability a MoE layer skips routing for a step")
    g.add_argument("--moe-local-drop", type=float, metavar="P",
                   help="fairseq nllb-branch spelling of --moe-gating-dropout with gate_drop")
    g.add_argument("--moe-gating-dropout-mode", choices=GATING_DROPOUT_MODES,
                   help="gate_drop: tokens go to a local expert; gate_expert_drop: the layer is skipped")
    g.add_argument("--moe-top-k-min", type=int, help="random router: k at update 0 (1)")
    g.add_argument("--moe-top-k-max", type=int, help="random router: final k (default: all experts)")
    g.add_argument("--moe-top-k-schedule", choices=SCHEDULES, help="random router: k schedule (linear)")
    g.add_argument("--moe-top-k-schedule-steps", type=int, help="random router: updates to reach k_max (1000)")


def set_moe_defaults(args):
    """Defaults applied by the architectures (fairseq's getattr idiom keeps explicit flags)."""
    defaults = dict(
        moe_expert_count=0, moe_freq=0, encoder_moe_freq=None, decoder_moe_freq=None, moe_router="top2",
        moe_top1_expert=False, moe_top_k=2, moe_capacity_factor=None, moe_eval_capacity_factor=None,
        moe_dropless=False, moe_second_expert_policy="sampling", moe_normalize_gate_prob_before_dropping=False,
        moe_gating_use_fp32=True, moe_gate_loss_wt=0.01, moe_z_loss_wt=0.0, moe_importance_loss_wt=0.01,
        moe_load_loss_wt=0.01, moe_jitter_eps=0.0, moe_expert_dropout=None, moe_expert_ffn_dim=None,
        moe_split_ffn=False, moe_gating_dropout=None, moe_local_drop=None, moe_gating_dropout_mode="gate_drop",
        moe_top_k_min=1, moe_top_k_max=None, moe_top_k_schedule="linear", moe_top_k_schedule_steps=1000,
    )
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def moe_config_from_args(args) -> MoEConfig:
    router = "top1" if getattr(args, "moe_top1_expert", False) else args.moe_router
    rate = args.moe_gating_dropout
    if rate is None:
        rate = args.moe_local_drop if args.moe_local_drop is not None else 0.0
    expert_dropout = args.moe_expert_dropout
    if expert_dropout is None:
        expert_dropout = getattr(args, "activation_dropout", 0.0) or 0.0
    return MoEConfig(
        num_experts=args.moe_expert_count, router=router, top_k=args.moe_top_k,
        capacity_factor=args.moe_capacity_factor, eval_capacity_factor=args.moe_eval_capacity_factor,
        dropless=args.moe_dropless, second_expert_policy=args.moe_second_expert_policy,
        normalize_gate_prob_before_dropping=args.moe_normalize_gate_prob_before_dropping,
        gate_loss_weight=args.moe_gate_loss_wt, z_loss_weight=args.moe_z_loss_wt,
        importance_loss_weight=args.moe_importance_loss_wt, load_loss_weight=args.moe_load_loss_wt,
        jitter_eps=args.moe_jitter_eps, expert_dropout=expert_dropout, gating_dropout=rate,
        gating_dropout_mode=args.moe_gating_dropout_mode, top_k_min=args.moe_top_k_min,
        top_k_max=args.moe_top_k_max, top_k_schedule=args.moe_top_k_schedule,
        top_k_schedule_steps=args.moe_top_k_schedule_steps,
        eval_top_k=getattr(args, "moe_eval_top_k", None), seed=getattr(args, "seed", 1),
    )


def moe_layer_indices(freq: int, num_layers: int, flag: str):
    """Layers i with (i + 1) % freq == 0 (fairseq's moe branch rule)."""
    if not freq:
        return set()
    if freq < 0 or freq > num_layers:
        raise MoEUsageError(f"{flag}={freq} must be between 0 and the number of layers ({num_layers})")
    return {i for i in range(num_layers) if (i + 1) % freq == 0}
