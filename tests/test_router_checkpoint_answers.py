"""What the checkpoint tools ask a router (through the registry) and checkpoint/format.py
(parameter names) instead of knowing router names: the options pruning changes, the rows kept,
the tensors fixed at initialisation."""
import argparse

import pytest
import torch

from moe_fairseq.checkpoint.format import moe_layer_names, router_tensor
from moe_fairseq.checkpoint.saved_args import saved_args
from moe_fairseq.moe import MoEConfig, build_moe_layer
from moe_fairseq.moe.routers import ROUTERS


def saved(**args):
    """A checkpoint state whose saved args are these (as fairseq 0.12 saves a legacy model's)."""
    return {"model": {}, "cfg": {"model": argparse.Namespace(**args), "task": argparse.Namespace(**args)}}


def expected_changes(args, keep):
    """The rule moe-prune's docstring states, written out per router."""
    router = "top1" if args.get("moe_top1_expert") else args.get("moe_router", "top2")
    names = {"top2": [], "noisy_topk": ["moe_top_k", "moe_eval_top_k"],
             "random": ["moe_top_k_max", "moe_top_k_min", "moe_eval_top_k"]}.get(router, [])
    out = {"moe_router": "top1"} if router == "top2" and keep == 1 else {}
    out.update((n, keep) for n in names if args.get(n) is not None and args[n] > keep)
    return out


@pytest.mark.parametrize("args", [
    dict(moe_router="top2"), dict(moe_router="top1"), dict(moe_router="top2", moe_top1_expert=True),
    dict(moe_router="noisy_topk", moe_top_k=3, moe_eval_top_k=4),
    dict(moe_router="noisy_topk", moe_top_k=1),
    dict(moe_router="random", moe_top_k_max=6, moe_top_k_min=3, moe_eval_top_k=2),
    dict(moe_router="random", moe_top_k_min=2),
])
@pytest.mark.parametrize("keep", [1, 2, 5])
def test_pruning_changes_what_the_rule_says(args, keep):
    from moe_fairseq.moe.config import field_dest

    cfg = saved_args(saved(moe_expert_count=8, **args)).moe_config()
    got = {field_dest(k): v for k, v in ROUTERS[cfg.router].config_for_experts(cfg, keep).items()}
    assert got == expected_changes(args, keep)


def test_a_router_keeps_the_rows_of_the_kept_experts_and_names_its_frozen_tensors():
    torch.manual_seed(0)
    for name in ("top1", "top2", "noisy_topk", "random"):
        layer = build_moe_layer(MoEConfig(num_experts=4, router=name), 3, 5)
        state = {f"encoder.layers.1.fc1.moe.{k}": v for k, v in layer.state_dict().items()}
        assert moe_layer_names(state) == ["encoder.layers.1.fc1.moe"]
        kept = torch.tensor([3, 1])
        for full, tensor in state.items():
            own = router_tensor("encoder.layers.1.fc1.moe", full)
            if own is None:
                continue
            rows = ROUTERS[name].rows_of_experts(own, tensor, kept)
            assert torch.equal(rows, torch.stack([tensor[3], tensor[1]]))
        frozen = {own for own in (router_tensor("encoder.layers.1.fc1.moe", k) for k in state) if own} \
            - {n for n, _ in layer.router.named_parameters()}
        assert set(ROUTERS[name].frozen_tensors) == frozen  # the buffers: nothing trains them
    with pytest.raises(ValueError, match="has no row per expert"):
        ROUTERS["top1"].rows_of_experts("scale", torch.tensor(1.0), torch.tensor([0]))
    assert router_tensor("decoder.layers.0.fc1.moe", "decoder.layers.0.fc1.moe.experts.w1") is None
