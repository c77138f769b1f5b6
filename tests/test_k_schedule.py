"""SMoE-Dropout's k curriculum and self-slimmable (eval-time) k."""
import math

import pytest
import torch

from moe_fairseq.moe import KSchedule, MoEConfig, RandomRouter, build_moe_layer

pytestmark = pytest.mark.usefixtures("one_thread")


def ref_linear(k_min, k_max, T, t):
    """clip(round((k_max - k_min) * t / T) + k_min, k_min, k_max), round half up, exact rationals."""
    from fractions import Fraction
    v = Fraction(k_max - k_min) * t / T
    r = math.floor(v + Fraction(1, 2))
    return min(max(r + k_min, k_min), k_max)


def test_linear_explicit_values():
    s = KSchedule(1, 4, 6, "linear")
    # (k_max - k_min) t / T = 0, .5, 1, 1.5, 2, 2.5, 3: half rounds up (round() would give 0, 2, 2)
    assert [s(t) for t in range(7)] == [1, 2, 2, 3, 3, 4, 4]
    s = KSchedule(2, 16, 100, "linear")
    assert [s(t) for t in (-5, 0, 1, 3, 4, 50, 96, 97, 100, 150, 10 ** 9)] == [2, 2, 2, 2, 3, 9, 15, 16, 16, 16, 16]
    s = KSchedule(8, 16, 1000)
    assert s(0) == 8 and s(62) == 8 and s(63) == 9 and s(500) == 12 and s(1000) == 16


@pytest.mark.parametrize("k_min,k_max,T", [(1, 4, 6), (2, 16, 100), (1, 8, 7), (3, 3, 10), (1, 16, 1000)])
def test_linear_matches_formula(k_min, k_max, T):
    s = KSchedule(k_min, k_max, T, "linear")
    for t in list(range(-3, T + 5)) + [2 * T, 10 * T]:
        assert s(t) == ref_linear(k_min, k_max, T, t), t


@pytest.mark.parametrize("mode", ["cosine", "exponential", "linear"])
@pytest.mark.parametrize("k_min,k_max,T", [(1, 16, 100), (2, 8, 37), (4, 4, 10), (1, 2, 5)])
def test_monotone_with_endpoints(mode, k_min, k_max, T):
    s = KSchedule(k_min, k_max, T, mode)
    ks = [s(t) for t in range(-2, 2 * T)]
    assert all(a <= b for a, b in zip(ks, ks[1:]))
    assert s(0) == k_min and s(-10) == k_min
    assert s(T) == k_max and s(5 * T) == k_max
    assert all(k_min <= k <= k_max for k in ks)


def test_cosine_and_exponential_explicit():
    s = KSchedule(1, 9, 4, "cosine")  # 1 + 8 (1 - cos(pi t / 4)) / 2 = 1, 2.17, 5, 7.83, 9
    assert [s(t) for t in range(5)] == [1, 2, 5, 8, 9]
    s = KSchedule(1, 16, 4, "exponential")  # 16 ** (t / 4) = 1, 2, 4, 8, 16
    assert [s(t) for t in range(5)] == [1, 2, 4, 8, 16]
    s = KSchedule(2, 8, 2, "exponential")  # 2 * 4 ** (t / 2) = 2, 4, 8
    assert [s(t) for t in range(3)] == [2, 4, 8]


def test_fixed():
    s = KSchedule(2, 5, 0, "fixed")
    assert all(s(t) == 5 for t in (-1, 0, 1, 100, 10 ** 6))


@pytest.mark.parametrize("args,flag", [
    ((3, 2, 10, "linear"), "--moe-top-k-min"),
    ((0, 2, 10, "linear"), "--moe-top-k-min"),
    ((1, 2, 0, "linear"), "--moe-top-k-schedule-steps"),
    ((1, 2, 10, "step"), "--moe-top-k-schedule"),
])
def test_schedule_bad_input(args, flag):
    with pytest.raises(ValueError, match=flag):
        KSchedule(*args)


def test_config_k_schedule_errors():
    with pytest.raises(ValueError, match="--moe-top-k-min"):
        MoEConfig(num_experts=4, router="random", top_k_min=3, top_k_max=2).validate()
    with pytest.raises(ValueError, match="--moe-top-k-max"):
        MoEConfig(num_experts=4, router="random", top_k_max=5).validate()
    with pytest.raises(ValueError, match="--moe-eval-top-k"):
        MoEConfig(num_experts=4, router="random", eval_top_k=5).validate()


def test_random_router_k_follows_schedule_in_training():
    E, M, S = 8, 6, 9
    router = RandomRouter(M, E, KSchedule(2, 8, 12, "linear"))
    x = torch.randn(S, M)
    router.train()
    for t in (0, 1, 2, 3, 6, 9, 12, 40):
        router.set_num_updates(t)
        r = router(x)
        assert r.expert_index.shape == (S, ref_linear(2, 8, 12, t))
    router.eval()
    assert router(x).expert_index.shape == (S, 8)  # eval without override: k_max


def test_layer_propagates_num_updates_to_router_via_config():
    """The layer built from a config: k grows with the update number given to the layer."""
    cfg = MoEConfig(num_experts=4, router="random", top_k_min=1, top_k_max=4, top_k_schedule_steps=3)
    layer = build_moe_layer(cfg, 6, 8)
    x = torch.randn(5, 6)
    seen = []
    layer.router.register_forward_hook(lambda m, i, o: seen.append(o.expert_index.shape[1]))
    layer.train()
    for t in range(5):
        layer.set_num_updates(t)
        layer(x)
    assert seen == [1, 2, 3, 4, 4]


@pytest.mark.parametrize("eval_k", [1, 2, 3, 5, 6])
def test_eval_k_override(eval_k):
    E, M, S = 6, 5, 11
    router = RandomRouter(M, E, KSchedule(1, 3, 10), eval_k=eval_k)
    x = torch.randn(S, M, generator=torch.Generator().manual_seed(eval_k))
    router.eval()
    r = router(x)
    assert r.expert_index.shape == (S, eval_k)
    logits = x.double() @ router.weight.double().t()
    for t in range(S):
        ref_idx = sorted(range(E), key=lambda e: -float(logits[t, e]))[:eval_k]
        assert r.expert_index[t].tolist() == ref_idx
        ref_g = torch.softmax(logits[t, ref_idx], 0)
        torch.testing.assert_close(r.gate[t].double(), ref_g, atol=1e-6, rtol=0)
    if eval_k == E:  # every expert used, weighted by the softmax of all logits
        dense = torch.zeros(S, E, dtype=torch.float64).scatter(1, r.expert_index, r.gate.double())
        torch.testing.assert_close(dense, torch.softmax(logits, -1), atol=1e-6, rtol=0)
    # training ignores eval_k: k comes from the schedule
    router.train()
    router.set_num_updates(0)
    assert router(x).expert_index.shape == (S, 1)


def test_noisy_topk_eval_k_override():
    from moe_fairseq.moe import NoisyTopKRouter
    router = NoisyTopKRouter(5, 6, k=2, eval_k=6)
    with torch.no_grad():
        router.w_gate.normal_()
    x = torch.randn(4, 5)
    router.eval()
    r = router(x)
    dense = torch.zeros(4, 6, dtype=torch.float64).scatter(1, r.expert_index, r.gate.double())
    torch.testing.assert_close(dense, torch.softmax(x.double() @ router.w_gate.detach().double().t(), -1),
                               atol=1e-6, rtol=0)
