"""The MoE flags, generated from the MoEConfig / MoEModelOptions fields: the same names and
defaults as before they were generated, the aliases, and the mapping to a MoEConfig."""
import argparse

import pytest

from moe_fairseq.models.moe_args import add_moe_args, moe_config_from_args, set_moe_defaults
from moe_fairseq.moe.errors import MoEUsageError

# What the architectures set when a flag is not given (README's flags table); written out by
# hand on purpose: a generated default that drifts fails here.
DEFAULTS = dict(
    moe_expert_count=0, moe_freq=0, encoder_moe_freq=None, decoder_moe_freq=None, moe_router="top2",
    moe_top1_expert=False, moe_top_k=2, moe_capacity_factor=None, moe_eval_capacity_factor=None,
    moe_dropless=False, moe_second_expert_policy="sampling", moe_normalize_gate_prob_before_dropping=False,
    moe_gating_use_fp32=False, moe_gate_loss_wt=0.01, moe_z_loss_wt=0.0, moe_importance_loss_wt=0.01,
    moe_load_loss_wt=0.01, moe_jitter_eps=0.0, moe_expert_dropout=None, moe_expert_ffn_dim=None,
    moe_split_ffn=False, moe_gating_dropout=None, moe_local_drop=None, moe_gating_dropout_mode="gate_drop",
    moe_top_k_min=1, moe_top_k_max=None, moe_top_k_schedule="linear", moe_top_k_schedule_steps=1000,
)


def parse(*argv, **fairseq_args):
    parser = argparse.ArgumentParser()
    add_moe_args(parser)
    args = parser.parse_args(argv)
    set_moe_defaults(args)
    for key, value in dict(dict(activation_dropout=0.1, seed=5), **fairseq_args).items():
        setattr(args, key, value)
    return args


def test_flags_and_defaults_are_unchanged():
    empty = argparse.Namespace()
    set_moe_defaults(empty)
    assert vars(empty) == DEFAULTS
    parser = argparse.ArgumentParser()
    add_moe_args(parser)
    flags = {opt for action in parser._actions for opt in action.option_strings} - {"-h", "--help"}
    assert flags == {"--" + name.replace("_", "-") for name in DEFAULTS}
    # explicit flags survive the architecture defaults, including falsy ones
    args = parse("--moe-expert-count", "4", "--moe-gate-loss-wt", "0", "--moe-top-k-max", "3")
    assert (args.moe_expert_count, args.moe_gate_loss_wt, args.moe_top_k_max) == (4, 0.0, 3)


def test_config_from_args():
    cfg = moe_config_from_args(parse("--moe-expert-count", "4", "--moe-router", "random", "--moe-top-k-max", "4",
                                     "--moe-dropless", moe_eval_top_k=2))
    assert (cfg.num_experts, cfg.router, cfg.top_k_max, cfg.dropless, cfg.eval_top_k) == (4, "random", 4, True, 2)
    assert (cfg.expert_dropout, cfg.gating_dropout, cfg.seed, cfg.capacity_factor) == (0.1, 0.0, 5, None)
    assert moe_config_from_args(parse("--moe-expert-count", "4", "--moe-expert-dropout", "0.3")).expert_dropout == 0.3


@pytest.mark.parametrize("argv,field,value", [
    (["--moe-top1-expert"], "router", "top1"),
    (["--moe-top1-expert", "--moe-router", "top2"], "router", "top1"),  # the switch wins
    (["--moe-local-drop", "0.2"], "gating_dropout", 0.2),
    (["--moe-local-drop", "0.2", "--moe-gating-dropout", "0.1"], "gating_dropout", 0.1),  # the flag itself wins
])
def test_aliases(argv, field, value):
    assert getattr(moe_config_from_args(parse("--moe-expert-count", "4", *argv)), field) == value


@pytest.mark.parametrize("argv,flag", [
    (["--moe-local-drop", "1.5"], "--moe-gating-dropout"),
    (["--moe-gating-dropout", "-0.1"], "--moe-gating-dropout"),
    (["--moe-z-loss-wt", "-1"], "--moe-z-loss-wt"),
    (["--moe-expert-dropout", "1"], "--moe-expert-dropout"),
])
def test_bad_values_name_their_flag_in_one_line(argv, flag):
    with pytest.raises(MoEUsageError, match=flag) as err:
        moe_config_from_args(parse("--moe-expert-count", "4", *argv)).validate()
    assert "\n" not in str(err.value)


def test_unknown_choice_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse("--moe-router", "top3")
    assert "--moe-router: invalid choice: 'top3'" in capsys.readouterr().err


def test_the_name_converter_is_argparses_rule():
    """flag_dest / dest_flag (used by the config, the flags and the ranks' agreement check) agree
    with the attribute argparse itself stores each MoE flag in, aliases included."""
    from moe_fairseq.models.moe_args import add_flags
    from moe_fairseq.moe.config import dest_flag, flag_dest

    parser = argparse.ArgumentParser()
    for scope in ("model", "task"):
        add_flags(parser, scope)
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(actions) == len(DEFAULTS) + 1  # + the task's --moe-eval-top-k
    for action in actions:
        (flag,) = action.option_strings
        assert flag_dest(flag) == action.dest and dest_flag(action.dest) == flag
