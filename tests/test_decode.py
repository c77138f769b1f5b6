"""The decoder-step path of the MoE layer (moe/decode.py): the same outputs as the general
dispatch and as a per-token brute force, taken exactly when it should be, one intra-op thread
inside it and the caller's thread count restored after it."""
import pytest
import torch

import moe_fairseq.moe.decode as decode
from moe_fairseq.moe import FFNExperts, KSchedule, MoELayer, NoisyTopKRouter, RandomRouter, Top1Router, Top2Router
from moe_fairseq.moe.aux_mode import AuxMode

M, E, F = 16, 8, 24


def make_layer(kind, dtype=torch.float32, activation="relu", seed=0):
    torch.manual_seed(seed)
    if kind == "top1":
        router = Top1Router(M, E, capacity_factor=None, eval_capacity_factor=None)
    elif kind == "top2":
        router = Top2Router(M, E, capacity_factor=None, eval_capacity_factor=None)
    elif kind == "noisy_topk":
        router = NoisyTopKRouter(M, E, k=3, capacity_factor=None, eval_capacity_factor=None)
        with torch.no_grad():
            router.w_gate.normal_()
    elif kind.startswith("random"):  # SMoE-Dropout at evaluation k = random@K
        router = RandomRouter(M, E, KSchedule(1, E, 10), eval_k=int(kind.split("@")[1]))
    else:
        raise AssertionError(kind)
    return MoELayer(router, FFNExperts(E, M, F, activation)).to(dtype).eval()


def brute_force(layer, x):
    """Per token, per routed slot: gate * relu/act(x w1 + b1) w2 + b2, in float64, with the
    routing read from the router itself."""
    routing = layer.router(x)
    ex = layer.experts
    out = torch.zeros(x.shape, dtype=torch.float64)
    for s in range(x.shape[0]):
        for j in range(routing.expert_index.shape[1]):
            e = int(routing.expert_index[s, j])
            w1, b1, w2, b2 = (t[e].double() for t in (ex.w1, ex.b1, ex.w2, ex.b2))
            h = ex.activation(x[s].double() @ w1 + b1)
            out[s] += float(routing.gate[s, j]) * (h @ w2 + b2)
    return out


@pytest.fixture()
def calls(monkeypatch):
    """Records every call of the decode path with the intra-op thread count inside it."""
    seen = []
    real = decode.few_rows_ffn

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "few_rows_ffn", spy)
    return seen


@pytest.mark.parametrize("kind", ["top1", "top2", "noisy_topk", "random@1", "random@2", "random@8"])
@pytest.mark.parametrize("rows", [1, 2, 5, 17, decode.DECODE_MAX_TOKENS])
def test_decode_step_equals_the_general_path_and_a_brute_force(kind, rows, calls):
    layer = make_layer(kind)
    x = torch.randn(rows, M)
    with torch.no_grad():
        fast = layer(x)
        assert len(calls) == 1  # the decode path ran
        layer.decode_fast_path = False
        general = layer(x)
        assert len(calls) == 1  # and this time it did not
        want = brute_force(layer, x)
    torch.testing.assert_close(fast, general, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 5])  # one row takes few_rows_ffn's scalar-gate branch
def test_decode_step_with_gelu_experts_and_in_bfloat16(calls, rows):
    for dtype, activation, tol in ((torch.float32, "gelu", 1e-5), (torch.bfloat16, "relu", 2e-2)):
        layer = make_layer("top2", dtype=dtype, activation=activation)
        x = torch.randn(rows, M, dtype=dtype)
        with torch.no_grad():
            fast = layer(x)
            layer.decode_fast_path = False
            general = layer(x)
        assert fast.dtype == dtype
        torch.testing.assert_close(fast.float(), general.float(), rtol=tol, atol=tol)
    assert len(calls) == 2


@pytest.mark.parametrize("kind", ["top1", "top2", "noisy_topk", "random@1", "random@3", "random@8"])
@pytest.mark.parametrize("ties", [False, True])
def test_a_router_routes_alike_in_every_aux_mode(kind, ties):
    """A decoder step reads the ids and gates of the router's forward with AuxMode.NONE: they
    are exactly those of a call that computes losses and statistics (what validation and the
    brute forces see), also when every logit ties (a zero router weight: the choice between
    equals must agree)."""
    layer = make_layer(kind)
    router = layer.router
    if ties:
        with torch.no_grad():
            for name in ("wg", "w_gate", "weight"):
                if isinstance(getattr(router, name, None), (torch.nn.Linear, torch.Tensor)):
                    target = getattr(router, name)
                    (target.weight if isinstance(target, torch.nn.Linear) else target).zero_()
    x = torch.randn(9, M)
    with torch.no_grad():
        routing = router(x, AuxMode.ALL)
        bare = router(x, AuxMode.NONE)
    assert torch.equal(bare.expert_index, routing.expert_index)
    gate = bare.gate
    assert torch.equal(gate, routing.gate)
    assert bare.losses == {}
    if ties:
        assert torch.equal(gate, torch.full_like(gate, gate[0, 0].item()))  # the ties were real


@pytest.mark.parametrize("kind", ["top1", "top2", "noisy_topk", "random@2"])
def test_a_decoder_steps_routing_builds_only_ids_and_gates(kind):
    """What keeps the one router forward as cheap as a decoder step needs: in dropless
    evaluation with AuxMode.NONE the keep mask and drop count are not made (made on first read,
    all kept, none dropped), and no losses or probabilities for statistics are computed."""
    router = make_layer(kind).router
    with torch.no_grad():
        routing = router(torch.randn(3, M), AuxMode.NONE)
    assert routing._keep is None and routing._dropped is None
    assert routing.losses == {}
    if kind in ("noisy_topk", "random@2"):  # the softmax routers need their probabilities to route
        assert routing.probs is None
    assert bool(routing.keep.all()) and routing.keep.shape == routing.expert_index.shape
    assert int(routing.dropped_by_capacity) == 0


def test_decode_step_runs_on_one_thread_and_restores_the_callers(calls):
    layer = make_layer("top2")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            layer(torch.randn(3, M))
        assert calls == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_failing_decode_step_restores_the_thread_count(monkeypatch):
    layer = make_layer("top2")

    def boom(*args, **kwargs):
        raise RuntimeError("expert failed")

    monkeypatch.setattr(decode, "few_rows_ffn", boom)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="expert failed"):
            layer(torch.randn(3, M))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("case", ["training", "grad", "too_many_rows", "aux_mode", "losses_argument", "capacity",
                                  "autocast", "switched_off"])
def test_decode_path_is_taken_only_for_decoder_steps(case, calls):
    """Anything a decoder step is not (training, autograd, many rows, losses or statistics asked
    for, a capacity that may drop slots, autocast) goes through the general dispatch, and gives
    its output."""
    layer = make_layer("top2")
    rows = decode.DECODE_MAX_TOKENS + 1 if case == "too_many_rows" else 4
    x = torch.randn(rows, M)
    if case == "training":
        layer.train()
    elif case == "aux_mode":  # validation: the criterion's computing_aux
        layer.aux_mode = AuxMode.ALL
    elif case == "capacity":
        layer.router.eval_capacity_factor = 1.0
    elif case == "switched_off":
        layer.decode_fast_path = False
    if case == "grad":
        out = layer(x)
    elif case == "autocast":
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
    else:
        with torch.no_grad():
            out = layer(x, aux_mode=AuxMode.LOSSES if case == "losses_argument" else None)
    assert calls == []
    if case == "aux_mode":
        assert layer.aux.stats is not None
    if case == "losses_argument":
        assert "balance" in layer.aux.losses
    if case not in ("training", "capacity", "autocast"):  # these route differently (noise, drops, bf16)
        torch.testing.assert_close(out.float(), brute_force(layer, x).float(), rtol=1e-4, atol=1e-4)


def test_padding_rows_stay_zero_on_the_decode_path(calls):
    layer = make_layer("top2")
    x = torch.randn(2, 3, M)
    pad = torch.tensor([[False, False, True], [False, True, True]])
    with torch.no_grad():
        out = layer(x, pad)
        layer.decode_fast_path = False
        general = layer(x, pad)
    assert len(calls) == 1
    assert torch.equal(out[pad], torch.zeros(3, M))
    torch.testing.assert_close(out, general, rtol=1e-5, atol=1e-5)
