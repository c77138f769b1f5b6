"""MoELayer end to end: per-token reference outputs, padding, gradients, the frozen router, bad flags."""
import math

import pytest
import torch

from moe_fairseq.moe import (FFNExperts, KSchedule, MoEConfig, MoELayer, NoisyTopKRouter, RandomRouter,
                             Top1Router, Top2Router, build_moe_layer)
from moe_fairseq.moe.aux_mode import AuxMode

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- helpers
def ref_expert(x_row, w1, b1, w2, b2):
    """relu(x w1 + b1) w2 + b2 for one token by explicit sums (float64 Python)."""
    x_row, w1, b1, w2, b2 = (t.detach() for t in (x_row, w1, b1, w2, b2))
    M, F = w1.shape
    h = [max(0.0, sum(float(x_row[m]) * float(w1[m, f]) for m in range(M)) + float(b1[f])) for f in range(F)]
    return [sum(h[f] * float(w2[f, m]) for f in range(F)) + float(b2[m]) for m in range(M)]


def make_router(kind, M, E, seed=0):
    torch.manual_seed(seed)
    if kind == "top1":
        r = Top1Router(M, E, capacity_factor=1.0, eval_capacity_factor=2.0, z_loss_weight=1e-3)
    elif kind == "top1_dropless":
        r = Top1Router(M, E, capacity_factor=None, eval_capacity_factor=None)
    elif kind.startswith("top2_"):
        r = Top2Router(M, E, capacity_factor=1.0, second_expert_policy=kind[5:], z_loss_weight=1e-3)
    elif kind == "noisy_topk":
        r = NoisyTopKRouter(M, E, k=2, importance_loss_weight=0.1, load_loss_weight=0.1)
        with torch.no_grad():
            r.w_gate.normal_()
            r.w_noise.normal_(std=0.3)
    elif kind == "noisy_topk_cap":
        r = NoisyTopKRouter(M, E, k=2, capacity_factor=1.0, eval_capacity_factor=1.0)
        with torch.no_grad():
            r.w_gate.normal_()
            r.w_noise.normal_(std=0.3)
    elif kind == "random":
        r = RandomRouter(M, E, KSchedule(1, E, 10), eval_k=2)
    else:
        raise AssertionError(kind)
    if hasattr(r, "wg"):  # skew towards expert 0 so capacity matters
        with torch.no_grad():
            r.wg.weight.normal_()
            r.wg.weight[0] += 0.5 * r.wg.weight[0].sign()
    return r


def make_layer(kind, M=6, E=4, F=5, seed=0, aux_mode=AuxMode.ALL, **kw):
    """aux_mode ALL: losses and statistics in evaluation mode too (as the criterion's validation
    asks for them); generation's default (None: nothing in evaluation) is tested on its own below."""
    router = make_router(kind, M, E, seed)
    experts = FFNExperts(E, M, F)
    layer = MoELayer(router, experts, **kw).double()
    layer.aux_mode = aux_mode
    return layer


def capture_routing(layer):
    seen = {}

    def hook(module, inputs, output):
        seen["x"] = inputs[0].detach().clone()
        seen["routing"] = output
    layer.router.register_forward_hook(hook)
    return seen


ROUTER_KINDS = ["top1", "top1_dropless", "top2_all", "top2_sampling", "top2_random", "noisy_topk",
                "noisy_topk_cap", "random"]


# --------------------------------------------------------------------------- output vs per-token loop
@pytest.mark.parametrize("kind", ROUTER_KINDS)
@pytest.mark.parametrize("training", [True, False])
def test_layer_output_matches_per_token_loop(kind, training):
    S, M, E = 23, 6, 4
    layer = make_layer(kind, M=M, E=E)
    layer.train(training)
    seen = capture_routing(layer)
    x = torch.randn(S, M, dtype=torch.float64)
    torch.manual_seed(1)
    y = layer(x)
    r = seen["routing"]
    assert torch.equal(seen["x"], x)
    ex = layer.experts
    for t in range(S):
        ref = [0.0] * M
        for j in range(r.expert_index.shape[1]):
            if r.keep[t, j]:
                e = int(r.expert_index[t, j])
                out = ref_expert(x[t], ex.w1[e], ex.b1[e], ex.w2[e], ex.b2[e])
                ref = [a + float(r.gate[t, j].detach()) * b for a, b in zip(ref, out)]
        torch.testing.assert_close(y[t], torch.tensor(ref, dtype=torch.float64))
    st = layer.aux.stats
    kept = r.expert_index[r.keep]
    assert st.tokens_per_expert.tolist() == torch.bincount(kept, minlength=E).tolist()
    assert float(st.num_tokens) == S
    assert float(st.requested_slots) == r.expert_index.numel()
    assert int(st.dropped_by_capacity) == int(r.dropped_by_capacity)
    assert float(st.gating_dropped) == 0.0
    assert set(layer.aux.losses) == set(r.losses)


def test_top1_layer_fully_independent_reference():
    """Routing recomputed here too: softmax, argmax, capacity ceil(cf*S/E) in token order."""
    S, M, E, F, cf = 30, 6, 4, 5, 1.0
    layer = make_layer("top1", M=M, E=E, F=F)
    layer.train()
    x = torch.randn(S, M, dtype=torch.float64)
    x[:, 0] += 1.0
    y = layer(x)
    W = layer.router.wg.weight.detach().double()
    C = math.ceil(cf * S / E)
    used = [0] * E
    ex = layer.experts
    dropped = 0
    for t in range(S):
        logits = [float(x[t] @ W[e]) for e in range(E)]
        m = max(logits)
        z = sum(math.exp(v - m) for v in logits)
        e = max(range(E), key=lambda i: logits[i])
        if used[e] < C:
            used[e] += 1
            g = math.exp(logits[e] - m) / z
            ref = [g * v for v in ref_expert(x[t], ex.w1[e], ex.b1[e], ex.w2[e], ex.b2[e])]
        else:
            dropped += 1
            ref = [0.0] * M  # dropped by capacity: the residual carries the token
        torch.testing.assert_close(y[t], torch.tensor(ref, dtype=torch.float64), atol=1e-6, rtol=1e-5)
    assert dropped > 0
    assert int(layer.aux.stats.dropped_by_capacity) == dropped
    assert layer.aux.stats.tokens_per_expert.tolist() == used


# --------------------------------------------------------------------------- padding
def pad_case(M, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 9, M, generator=g, dtype=torch.float64)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[0, 6:] = True
    pad[1, 0] = True  # left padding too
    pad[2, 3:5] = True
    x[pad] = 1e3 * torch.randn(int(pad.sum()), M, generator=g, dtype=torch.float64)  # loud garbage
    return x, pad


@pytest.mark.parametrize("kind", ROUTER_KINDS)
@pytest.mark.parametrize("training", [True, False])
def test_padding_is_never_routed_nor_counted(kind, training):
    M, E = 6, 4
    layer = make_layer(kind, M=M, E=E)
    layer.train(training)
    seen = capture_routing(layer)
    x, pad = pad_case(M)
    torch.manual_seed(3)
    y = layer(x, pad)
    n_real = int((~pad).sum())
    assert seen["x"].shape[0] == n_real  # the router saw only real tokens ...
    assert torch.equal(seen["x"], x[~pad])  # ... in order
    assert torch.all(y[pad] == 0)
    losses_pad = {k: v.detach().clone() for k, v in layer.aux.losses.items()}
    stats_pad = layer.aux.stats
    # the same layer on the non-padding tokens alone (same RNG state for stochastic routers)
    torch.manual_seed(3)
    y_ref = layer(x[~pad])
    torch.testing.assert_close(y[~pad], y_ref, atol=0, rtol=0)
    assert set(losses_pad) == set(layer.aux.losses)
    for k, v in layer.aux.losses.items():
        torch.testing.assert_close(losses_pad[k], v.detach(), atol=0, rtol=0)
    assert stats_pad.tokens_per_expert.tolist() == layer.aux.stats.tokens_per_expert.tolist()
    assert float(stats_pad.num_tokens) == n_real
    assert int(stats_pad.dropped_by_capacity) == int(layer.aux.stats.dropped_by_capacity)
    assert int(stats_pad.tokens_per_expert.sum()) <= n_real * seen["routing"].expert_index.shape[1]


def test_padding_changes_nothing_for_the_balance_loss_of_top1():
    """Explicit: the Switch balance loss of a padded batch is computed over real tokens only."""
    M, E = 6, 4
    layer = make_layer("top1_dropless", M=M, E=E)
    layer.train()
    x, pad = pad_case(M, seed=1)
    layer(x, pad)
    got = float(layer.aux.losses["balance"])
    W = layer.router.wg.weight.detach().double()
    real = x[~pad]
    S = real.shape[0]
    f, P = [0.0] * E, [0.0] * E
    for t in range(S):
        logits = [float(real[t] @ W[e]) for e in range(E)]
        m = max(logits)
        ex = [math.exp(v - m) for v in logits]
        p = [v / sum(ex) for v in ex]
        f[max(range(E), key=lambda i: p[i])] += 1 / S
        for i in range(E):
            P[i] += p[i] / S
    ref = 0.01 * E * sum(a * b for a, b in zip(f, P))
    assert abs(got - ref) < 1e-6 * ref


@pytest.mark.parametrize("kind", ["top1", "top2_sampling", "noisy_topk", "random"])
def test_all_padding_batch(kind):
    M, E = 6, 4
    layer = make_layer(kind, M=M, E=E)
    layer.train()
    x = torch.randn(2, 3, M, dtype=torch.float64, requires_grad=True)
    y = layer(x, torch.ones(2, 3, dtype=torch.bool))
    assert torch.all(y == 0)
    for name, v in layer.aux.losses.items():
        assert torch.isfinite(v), name
    total = y.sum() + sum(layer.aux.losses.values(), torch.zeros((), dtype=torch.float64))
    total.backward()
    assert float(layer.aux.stats.num_tokens) == 0
    assert layer.aux.stats.tokens_per_expert.sum() == 0


# --------------------------------------------------------------------------- gradients
def test_layer_gradcheck_float64_frozen_router():
    """End-to-end float64 gradcheck through padding, dispatch, experts and combine.  Routers
    compute gates in fp32, which is too coarse for finite differences, so: with k = 1 the gate is
    softmax of one logit = 1 (no gate path) and gradcheck covers x and the expert weights; with
    k = 2 and x held fixed the gates are constants and gradcheck covers the expert weights."""
    M, E, F = 4, 3, 3
    pad = torch.zeros(2, 4, dtype=torch.bool)
    pad[1, 3] = True
    for k in (1, 2):
        torch.manual_seed(k)
        router = RandomRouter(M, E, KSchedule(k, k, 0, "fixed"))
        layer = MoELayer(router, FFNExperts(E, M, F)).double()
        layer.eval()
        x = torch.randn(2, 4, M, dtype=torch.float64, requires_grad=(k == 1))
        names = [n for n, _ in layer.named_parameters()]
        params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]
        assert all(n.startswith("experts.") for n in names)

        if k == 1:
            def fn(x, *ps):
                return torch.func.functional_call(layer, dict(zip(names, ps)), (x, pad))
            assert torch.autograd.gradcheck(fn, (x, *params))
        else:
            def fn(*ps):
                return torch.func.functional_call(layer, dict(zip(names, ps)), (x, pad))
            assert torch.autograd.gradcheck(fn, tuple(params))


@pytest.mark.parametrize("kind", ["top1", "top1_dropless", "top2_all", "noisy_topk", "random"])
def test_router_gradients_match_float64_reference(kind):
    """d(loss)/d(router weight) and d(loss)/dx through the gates (fp32 inside the router) against
    a float64 reference built token by token with the same routing decisions."""
    S, M, E, F = 16, 5, 4, 6
    layer = make_layer(kind, M=M, E=E, F=F, seed=2)
    layer.eval()  # deterministic routing (noisy_topk: clean logits)
    seen = capture_routing(layer)
    x = torch.randn(S, M, dtype=torch.float64, requires_grad=True)
    target = torch.randn(S, M, dtype=torch.float64)
    y = layer(x)
    aux = sum(layer.aux.losses.values(), torch.zeros((), dtype=torch.float64))
    ((y * target).sum() + aux).backward()
    r = seen["routing"]
    if kind == "random":  # frozen: a buffer that gets no gradient, but x does through the gates
        got_w, W0 = None, layer.router.weight
        assert W0.grad is None
    else:
        wname = "wg.weight" if hasattr(layer.router, "wg") else "w_gate"
        W0 = dict(layer.router.named_parameters())[wname]
        got_w = W0.grad.double()
    W = W0.detach().double().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    ex = {n: p.detach() for n, p in layer.experts.named_parameters()}
    total = torch.zeros((), dtype=torch.float64)
    k = r.expert_index.shape[1]
    probs_rows, gate_rows = [], []
    for t in range(S):
        logits = xr[t] @ W.t()
        if kind.startswith("noisy") or kind == "random":
            chosen = r.expert_index[t]
            gates = torch.softmax(logits[chosen], 0)
        elif kind.startswith("top2"):
            p = torch.softmax(logits, 0)
            gates = p[r.expert_index[t]] * r.keep[t]
            gates = gates / gates.sum().clamp_min(1e-30)
        else:
            p = torch.softmax(logits, 0)
            gates = p[r.expert_index[t]]
        gates = gates * r.keep[t]
        probs_rows.append(torch.softmax(logits, 0))
        gate_rows.append(torch.zeros(E, dtype=torch.float64).index_add(0, r.expert_index[t], gates))
        for j in range(k):
            if r.keep[t, j]:
                e = int(r.expert_index[t, j])
                h = torch.relu(xr[t] @ ex["w1"][e] + ex["b1"][e])
                total = total + gates[j] * ((h @ ex["w2"][e] + ex["b2"][e]) * target[t]).sum()
    probs = torch.stack(probs_rows)
    top1 = probs.argmax(1)
    counts = torch.bincount(top1, minlength=E).double() / S
    if kind.startswith("top1"):
        total = total + 0.01 * E * (counts * probs.mean(0)).sum()
    if kind.startswith("top2"):
        total = total + 0.01 * E * E * (counts * probs.mean(0)).mean()
    if kind in ("top1", "top2_all"):  # z-loss 1e-3
        total = total + 1e-3 * (torch.logsumexp(xr @ W.t(), 1) ** 2).mean()
    if kind == "noisy_topk":
        imp = torch.stack(gate_rows).sum(0)
        total = total + 0.1 * imp.var(unbiased=False) / imp.mean() ** 2
    total.backward()
    if got_w is not None:
        torch.testing.assert_close(got_w, W.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- frozen random router
def test_frozen_random_router_survives_training():
    M, E = 6, 4
    cfg = MoEConfig(num_experts=E, router="random", top_k_min=1, top_k_max=E, top_k_schedule_steps=5)
    layer = build_moe_layer(cfg, M, 8)
    state = layer.state_dict()
    assert "router.weight" in state
    assert all(not n.startswith("router.") for n, _ in layer.named_parameters())
    assert not layer.router.weight.requires_grad
    w0 = layer.router.weight.clone()
    e0 = layer.experts.w1.detach().clone()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer.train()
    for step in range(4):
        layer.set_num_updates(step)
        opt.zero_grad()
        y = layer(torch.randn(12, M))
        (y ** 2).mean().backward()
        assert layer.router.weight.grad is None
        opt.step()
    assert torch.equal(layer.router.weight, w0)
    assert not torch.equal(layer.experts.w1, e0)  # the experts did train
    # and the router weight round-trips through a checkpoint
    other = build_moe_layer(cfg, M, 8)
    assert not torch.equal(other.router.weight, w0)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.router.weight, w0)
    # moved with .to()
    assert layer.double().router.weight.dtype == torch.float64


# --------------------------------------------------------------------------- config / bad flags
@pytest.mark.parametrize("router", ["top1", "top2", "noisy_topk", "random"])
def test_build_from_config_runs(router):
    cfg = MoEConfig(num_experts=4, router=router, top_k=2)
    layer = build_moe_layer(cfg, 6, 8)
    x = torch.randn(2, 5, 6)
    y = layer(x, torch.zeros(2, 5, dtype=torch.bool))
    assert y.shape == x.shape
    assert layer.aux.stats is not None


def test_build_split_hidden_dim_hidden_size():
    cfg = MoEConfig(num_experts=4, router="random")
    layer = build_moe_layer(cfg, 6, 16, split_hidden_dim=True)
    assert layer.experts.hidden_dim == 4
    with pytest.raises(ValueError, match="--moe-split-ffn"):
        build_moe_layer(cfg, 6, 18, split_hidden_dim=True)


def test_dropless_config_and_default_capacities():
    assert MoEConfig(router="top1").capacity_factors() == (1.0, 2.0)
    assert MoEConfig(router="top2").capacity_factors() == (1.0, 2.0)
    assert MoEConfig(router="noisy_topk").capacity_factors() == (None, None)
    assert MoEConfig(router="top1", dropless=True).capacity_factors() == (None, None)
    r = MoEConfig(router="top1", capacity_factor=1.25, eval_capacity_factor=3.0).build_router(4)
    assert (r.capacity_factor, r.eval_capacity_factor) == (1.25, 3.0)


@pytest.mark.parametrize("kw,flag", [
    (dict(router="top3"), "--moe-router"),
    (dict(router="noisy_topk", top_k=5, num_experts=4), "--moe-top-k"),
    (dict(router="noisy_topk", top_k=0, num_experts=4), "--moe-top-k"),
    (dict(router="noisy_topk", top_k=2, eval_top_k=5, num_experts=4), "--moe-eval-top-k"),
    (dict(router="top1", capacity_factor=0.0), "--moe-capacity-factor"),
    (dict(router="top2", capacity_factor=-1.0), "--moe-capacity-factor"),
    (dict(router="top1", eval_capacity_factor=0.0), "--moe-eval-capacity-factor"),
    (dict(gating_dropout=1.0), "--moe-gating-dropout"),
    (dict(gating_dropout=-0.1), "--moe-gating-dropout"),
    (dict(router="random", top_k_min=3, top_k_max=2, num_experts=4), "--moe-top-k-min"),
    (dict(router="random", top_k_max=5, num_experts=4), "--moe-top-k-max"),
    (dict(second_expert_policy="top"), "--moe-second-expert-policy"),
    (dict(router="top2", num_experts=1), "--moe-expert-count"),
    (dict(num_experts=0), "--moe-expert-count"),
    (dict(expert_dropout=1.0), "--moe-expert-dropout"),
    (dict(gate_loss_weight=-0.1), "--moe-gate-loss-wt"),
    (dict(top_k_schedule="step"), "--moe-top-k-schedule"),
])
def test_config_bad_input(kw, flag):
    with pytest.raises(ValueError, match=flag):
        MoEConfig(**kw).validate()
    with pytest.raises(ValueError, match=flag):
        build_moe_layer(MoEConfig(**kw), 4, 8)


def test_layer_comm_mismatch():
    from moe_fairseq.moe.comm import LocalComm
    with pytest.raises(ValueError):
        MoELayer(Top1Router(4, 4), FFNExperts(2, 4, 4), comm=LocalComm(4))


# --------------------------------------------------------------------------- inference fast path
@pytest.mark.parametrize("kind", ROUTER_KINDS)
def test_each_aux_mode_computes_what_it_says(kind):
    """Generation (evaluation, no mode asked): no losses, no statistics; validation (the layer's
    aux_mode set, as computing_aux does) and an explicit argument get them; LOSSES gives the
    losses alone, also in training; the output is the same in every mode."""
    S, M, E = 12, 6, 4
    x = torch.randn(S, M, dtype=torch.float64)
    layer = make_layer(kind, M=M, E=E, aux_mode=None).eval()
    y = layer(x)
    assert layer.aux.losses == {} and layer.aux.stats is None
    layer.aux_mode = AuxMode.ALL
    torch.testing.assert_close(layer(x), y)
    assert layer.aux.stats is not None
    has_losses = kind != "random"  # the frozen random router has no loss
    assert bool(layer.aux.losses) == has_losses
    losses, want = dict(layer.aux.losses), layer.aux.stats.tokens_per_expert.clone()
    layer.aux_mode = None
    torch.testing.assert_close(layer(x, aux_mode="losses+stats"), y)  # the argument, by name
    assert torch.equal(layer.aux.stats.tokens_per_expert, want)
    torch.testing.assert_close(layer(x, aux_mode=AuxMode.LOSSES), y)
    assert layer.aux.stats is None and layer.aux.losses.keys() == losses.keys()
    for name, value in losses.items():
        torch.testing.assert_close(layer.aux.losses[name], value)
    layer.aux_mode = AuxMode.NONE  # the argument wins over the attribute
    layer(x, aux_mode=AuxMode.ALL)
    assert layer.aux.stats is not None
    layer.aux_mode = AuxMode.LOSSES
    layer.train()
    layer(x)
    assert layer.aux.stats is None  # not even in training
    assert bool(layer.aux.losses) == has_losses  # but training still has its losses
    layer.aux_mode = None
    layer(x)
    assert layer.aux.stats is not None  # training's default: everything


def test_a_bad_aux_mode_is_refused_in_one_line():
    layer = make_layer("top1", aux_mode=None)
    with pytest.raises(ValueError, match=r"^aux_mode must be one of none, losses, losses\+stats \(got 'stats'\)$"):
        layer(torch.randn(3, 6, dtype=torch.float64), aux_mode="stats")


def test_computing_aux_restores_the_modes():
    from moe_fairseq.moe.collect import computing_aux

    model = torch.nn.ModuleList([make_layer("top2_all", aux_mode=None), make_layer("top1", aux_mode=AuxMode.ALL)])
    with computing_aux(model, "losses"):
        assert all(m.aux_mode is AuxMode.LOSSES for m in model)
    assert [m.aux_mode for m in model] == [None, AuxMode.ALL]


@pytest.mark.parametrize("kind", ["top1_dropless", "top2_all", "noisy_topk", "random"])
def test_dropless_evaluation_plans_without_host_counts(kind, monkeypatch):
    """Dropless evaluation, all experts local, experts that take device counts: the plan has no
    host split sizes, and the output equals the host-count (loop) path's."""
    import moe_fairseq.moe.layer as layer_mod

    S, M, E, F = 10, 8, 4, 12
    layer = make_layer(kind, M=M, E=E, F=F, aux_mode=None).float().eval()
    layer.router.capacity_factor = layer.router.eval_capacity_factor = None
    x = torch.randn(S, M)
    layer.experts.gemm = "loop"
    want = layer(x)
    plans = []
    real = layer_mod.plan_dispatch
    monkeypatch.setattr(layer_mod, "plan_dispatch", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    layer.experts.gemm = "grouped"
    torch.testing.assert_close(layer(x), want)
    assert plans[-1].counts_list is None
    layer.train()  # training reads the split sizes (the router may drop slots)
    layer(x)
    assert plans[-1].counts_list is not None


def test_capacity_no_expert_can_reach_is_skipped():
    """capacity >= S: apply_capacity would drop nothing, and is not run."""
    import moe_fairseq.moe.routers.base as base

    router = Top1Router(6, 2, capacity_factor=1.0, eval_capacity_factor=4.0).eval()  # C = ceil(4 S / 2) >= S
    calls = []
    real = base.apply_capacity
    base.apply_capacity = lambda *a: calls.append(1) or real(*a)
    try:
        r = router(torch.randn(9, 6))
        assert not calls and bool(r.keep.all()) and int(r.dropped_by_capacity) == 0
        router.train()  # C = ceil(9 / 2) = 5 < 9: applied
        router(torch.randn(9, 6))
        assert calls
    finally:
        base.apply_capacity = real
