"""The router registry: the built-in routers by name, and a new router added in one file with
one decorator (tests/toy_router.py) that the config, the layer and the flags then accept."""
import argparse

import pytest
import torch

from moe_fairseq.moe import KSchedule, MoEConfig, build_moe_layer
from moe_fairseq.moe.errors import MoEUsageError
from moe_fairseq.moe.routers import ROUTERS, NoisyTopKRouter, RandomRouter, Top1Router, Top2Router, register_router

pytestmark = pytest.mark.usefixtures("one_thread")


def test_builtin_routers_are_registered_in_order():
    assert list(ROUTERS.items()) == [("top1", Top1Router), ("top2", Top2Router), ("noisy_topk", NoisyTopKRouter),
                                     ("random", RandomRouter)]


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="'top2' is already registered"):
        register_router("top2")(Top1Router)


def test_a_router_added_in_one_file_trains_in_a_moe_layer(toy_router):
    cfg = MoEConfig(num_experts=3, router="toy_round_robin").validate()
    assert cfg.capacity_factors() == (None, None)  # the base class default: dropless
    layer = build_moe_layer(cfg, 4, 8)
    assert isinstance(layer.router, toy_router)
    x = torch.randn(2, 5, 4, requires_grad=True)
    y = layer(x, torch.zeros(2, 5, dtype=torch.bool))
    assert layer.aux.stats.tokens_per_expert.tolist() == [4, 3, 3]
    y.sum().backward()
    assert layer.experts.w1.grad is not None
    with pytest.raises(MoEUsageError, match="--moe-eval-top-k applies to the noisy_topk and random routers"):
        MoEConfig(num_experts=3, router="toy_round_robin", eval_top_k=1).validate()


def test_the_flags_accept_a_registered_router(toy_router):
    from moe_fairseq.models.moe_args import add_moe_args, moe_config_from_args, set_moe_defaults

    parser = argparse.ArgumentParser()
    add_moe_args(parser)
    args = parser.parse_args(["--moe-router", "toy_round_robin", "--moe-expert-count", "3"])
    set_moe_defaults(args)
    assert moe_config_from_args(args).validate().router == "toy_round_robin"


def test_an_unknown_router_names_the_registered_ones():
    with pytest.raises(MoEUsageError, match="--moe-router must be one of top1, top2, noisy_topk, random "):
        MoEConfig(router="toy_round_robin").validate()


@pytest.mark.parametrize("make", [lambda: RandomRouter(6, 4, KSchedule(1, 4, 100)),
                                  lambda: NoisyTopKRouter(6, 4, k=3)])
def test_evaluation_k_is_the_final_k_unless_set(make):
    router = make()
    router.set_num_updates(0)  # the random router's schedule is at k = 1 here
    x = torch.randn(5, 6)
    router.eval()
    assert router(x).expert_index.shape[1] == router.k
    router.set_eval_k(2)
    assert router(x).expert_index.shape[1] == 2
    router.set_eval_k(None)
    assert router(x).expert_index.shape[1] == router.k
