"""The MoE options are checked once: a MoEConfig when it is made, a model's flags once in
build_model (its MoEPlan: the config and which layers are MoE), and the layers trust both."""
import argparse
import types

import pytest
import torch

from moe_fairseq.moe import MoEConfig, build_moe_layer
from moe_fairseq.moe.errors import MoEUsageError


def tiny_model_args(*argv):
    import moe_fairseq.plugin  # noqa: F401  (the model and its architectures registered)
    from fairseq.models import ARCH_CONFIG_REGISTRY
    from moe_fairseq.models.transformer_moe import TransformerMoEModel

    parser = argparse.ArgumentParser()
    TransformerMoEModel.add_args(parser)
    args = parser.parse_args(list(argv))
    args = argparse.Namespace(**{k: v for k, v in vars(args).items() if v is not None})  # not given: absent
    args.arch = "transformer_moe_tiny"
    ARCH_CONFIG_REGISTRY[args.arch](args)  # what fairseq's models.build_model applies first
    return args


def build_tiny(*argv):
    from fairseq.data import Dictionary
    from moe_fairseq.models.transformer_moe import TransformerMoEModel

    vocab = Dictionary()
    for i in range(8):
        vocab.add_symbol(f"w{i}")
    task = types.SimpleNamespace(source_dictionary=vocab, target_dictionary=vocab)
    return TransformerMoEModel.build_model(tiny_model_args(*argv), task)


def test_a_config_is_checked_when_made_and_draws_nothing():
    state = torch.random.get_rng_state()
    with pytest.raises(MoEUsageError, match=r"^--moe-top-k must be between 1 and --moe-expert-count=4 \(got 5\)$"):
        MoEConfig(num_experts=4, router="noisy_topk", top_k=5)
    with pytest.raises(MoEUsageError, match=r"^--moe-router top2 needs --moe-expert-count >= 2 \(got 1\)$"):
        MoEConfig(num_experts=1, router="top2")
    MoEConfig(num_experts=4, router="random", top_k_max=2)  # its weight is drawn by the layer, not here
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_model_checks_its_flags_once(monkeypatch):
    calls = []
    validate = MoEConfig.validate
    monkeypatch.setattr(MoEConfig, "validate", lambda self: calls.append(1) or validate(self))
    model = build_tiny("--moe-expert-count", "4", "--encoder-moe-freq", "1", "--decoder-moe-freq", "2")
    assert len(calls) == 1  # not once per encoder, decoder or layer
    moe = [name for name, _ in model.named_modules() if name.endswith(".moe")]
    assert moe == ["encoder.layers.0.fc1.moe", "encoder.layers.1.fc1.moe", "decoder.layers.1.fc1.moe"]


@pytest.mark.parametrize("argv,message", [
    (["--moe-expert-count", "4", "--moe-freq", "3"], "--moe-freq=3 must be between 0 and the number of layers (2)"),
    (["--moe-expert-count", "4", "--decoder-moe-freq", "3"],
     "--decoder-moe-freq=3 must be between 0 and the number of layers (2)"),
    (["--moe-expert-count", "0", "--moe-freq", "2"], "--moe-freq=2 needs --moe-expert-count > 0"),
    (["--moe-expert-count", "-1"], "--moe-expert-count must be >= 0 (got -1)"),
    (["--moe-expert-count", "4", "--moe-split-ffn", "--moe-expert-ffn-dim", "8"],
     "--moe-split-ffn and --moe-expert-ffn-dim are exclusive"),
    (["--moe-expert-count", "4", "--moe-router", "noisy_topk", "--moe-top-k", "5"],
     "--moe-top-k must be between 1 and --moe-expert-count=4 (got 5)"),
])
def test_model_flags_are_refused_in_one_line_naming_the_flag(argv, message):
    from moe_fairseq.models.transformer_moe import moe_plan

    with pytest.raises(MoEUsageError) as err:
        moe_plan(tiny_model_args(*argv))
    assert str(err.value) == message


def test_a_dense_model_has_no_plan_for_moe_layers():
    from moe_fairseq.models.transformer_moe import moe_plan

    plan = moe_plan(tiny_model_args("--moe-expert-count", "0", "--moe-freq", "0", "--moe-split-ffn",
                                    "--moe-expert-ffn-dim", "8"))
    assert (plan.config, plan.encoder_layers, plan.decoder_layers) == (None, frozenset(), frozenset())


def test_the_world_size_rules_name_the_flags():
    with pytest.raises(MoEUsageError, match=r"^--moe-expert-count=3 cannot be sharded over a world size of 2"):
        MoEConfig(num_experts=3, router="top1").check_world_size(2)
    MoEConfig(num_experts=2, router="top1").check_world_size(4)


def test_building_a_layer_leaves_the_global_rng_where_it_did():
    """A layer draws from the global RNG what it drew when validation built a router of input
    size 1 per layer, so a model starts from the same weights at the same seed (the value below
    is what the code before that change left)."""
    torch.manual_seed(0)
    build_moe_layer(MoEConfig(num_experts=4, router="top2"), 8, 16)
    assert round(torch.rand(()).item(), 6) == 0.27697


def test_eval_top_k_at_generation_names_the_flag():
    from moe_fairseq.models.transformer_moe import apply_eval_overrides

    model = torch.nn.Sequential(build_moe_layer(MoEConfig(num_experts=4, router="top2"), 8, 16))
    with pytest.raises(MoEUsageError, match=r"^--moe-eval-top-k applies to the noisy_topk and random routers, "
                                            r"not to Top2Router$"):
        apply_eval_overrides(model, eval_top_k=1)
    model = torch.nn.Sequential(build_moe_layer(MoEConfig(num_experts=4, router="noisy_topk"), 8, 16))
    with pytest.raises(MoEUsageError, match=r"^--moe-eval-top-k must be between 1 and --moe-expert-count=4 \(got 5\)"):
        apply_eval_overrides(model, eval_top_k=5)
    with pytest.raises(MoEUsageError, match=r"^--moe-eval-capacity-factor must be > 0"):
        apply_eval_overrides(model, eval_capacity_factor=0.0)
    apply_eval_overrides(model, eval_top_k=3)
    assert model[0].router.eval_k == 3
