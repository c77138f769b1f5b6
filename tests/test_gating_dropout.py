"""Gating Dropout: firing rate, determinism across processes, and the three dropped-step modes."""
import math
import os
import subprocess
import sys

import pytest
import torch

from moe_fairseq.moe import FFNExperts, MoEConfig, MoELayer, Top1Router, Top2Router, build_moe_layer
from moe_fairseq.moe.aux_mode import AuxMode
from moe_fairseq.moe.comm import LocalComm
from moe_fairseq.moe.errors import MoEUsageError
from moe_fairseq.moe.gating_dropout import check_rate, gating_dropout_fires, uniform

pytestmark = pytest.mark.usefixtures("one_thread")

MOE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "moe_fairseq", "moe")


def ref_expert(x_row, w1, b1, w2, b2):
    x_row, w1, b1, w2, b2 = (t.detach() for t in (x_row, w1, b1, w2, b2))
    M, F = w1.shape
    h = [max(0.0, sum(float(x_row[m]) * float(w1[m, f]) for m in range(M)) + float(b1[f])) for f in range(F)]
    return [sum(h[f] * float(w2[f, m]) for f in range(F)) + float(b2[m]) for m in range(M)]


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_firing_fraction_close_to_p(p):
    n_updates, n_layers = 5000, 4
    fired = sum(gating_dropout_fires(p, 1, u, layer) for u in range(n_updates) for layer in range(n_layers))
    n = n_updates * n_layers
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(fired / n - p) < 3 * sigma
    # per layer too, and on another seed (the rate must not hinge on one lucky key)
    for layer in range(n_layers):
        f = sum(gating_dropout_fires(p, 1, u, layer) for u in range(n_updates)) / n_updates
        assert abs(f - p) < 4 * math.sqrt(p * (1 - p) / n_updates)
    f = sum(gating_dropout_fires(p, 12345, u, 0) for u in range(n_updates)) / n_updates
    assert abs(f - p) < 4 * math.sqrt(p * (1 - p) / n_updates)


def test_uniform_range_and_decorrelation():
    us = [uniform(7, u, layer) for u in range(2000) for layer in range(3)]
    assert all(0.0 <= v < 1.0 for v in us)
    # consecutive updates of one layer, and the layers of one update, are not correlated
    a = [uniform(7, u, 0) for u in range(3000)]
    b = [uniform(7, u + 1, 0) for u in range(3000)]
    c = [uniform(7, u, 1) for u in range(3000)]

    def corr(x, y):
        mx, my = sum(x) / len(x), sum(y) / len(y)
        cov = sum((i - mx) * (j - my) for i, j in zip(x, y))
        return cov / math.sqrt(sum((i - mx) ** 2 for i in x) * sum((j - my) ** 2 for j in y))

    assert abs(corr(a, b)) < 0.1 and abs(corr(a, c)) < 0.1


def test_zero_rate_never_fires():
    assert not any(gating_dropout_fires(0.0, 1, u, layer) for u in range(500) for layer in range(3))


# The child imports only gating_dropout.py (and its sibling imports), under a bare package stub:
# no torch and no package __init__, so it is quick and independent of this process's state.
_CHILD = """
import importlib, sys, types
pkg = types.ModuleType("gdpkg"); pkg.__path__ = [sys.argv[1]]; sys.modules["gdpkg"] = pkg
gd = importlib.import_module("gdpkg.gating_dropout")
print("".join("1" if gd.gating_dropout_fires(0.3, 17, u, l) else "0" for u in range(300) for l in range(4)))
"""


def test_same_decision_in_separate_processes():
    """Every rank derives the decision locally: separate processes (with different hash seeds)
    must agree bit for bit, with each other and with this process."""
    here = "".join("1" if gating_dropout_fires(0.3, 17, u, l) else "0" for u in range(300) for l in range(4))
    outs = []
    for hash_seed in ("0", "123"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        res = subprocess.run([sys.executable, "-c", _CHILD, MOE_DIR], capture_output=True, text=True, env=env,
                             timeout=60, check=True)
        outs.append(res.stdout.strip())
    assert outs[0] == outs[1] == here
    assert 0 < here.count("1") < len(here)


def make_layer(E=4, M=5, F=6, p=0.5, mode="gate_drop", layer_index=3, seed=1, comm=None):
    torch.manual_seed(seed)
    router = Top2Router(M, E, capacity_factor=1.0, second_expert_policy="all")
    experts = FFNExperts(E, M, F)
    layer = MoELayer(router, experts, layer_index=layer_index, comm=comm, gating_dropout=p,
                     gating_dropout_mode=mode, seed=seed)
    return layer.double()


def firing_update(p, seed, layer_index, fires=True):
    return next(u for u in range(1000) if gating_dropout_fires(p, seed, u, layer_index) == fires)


def test_separate_layer_instances_agree():
    a, b = make_layer(layer_index=2, seed=5), make_layer(layer_index=2, seed=5)
    c = make_layer(layer_index=3, seed=5)
    da, db, dc = [], [], []
    for u in range(200):
        for layer, d in ((a, da), (b, db), (c, dc)):
            layer.set_num_updates(u)
            d.append(layer.gating_dropped())
    assert da == db
    assert da != dc  # keyed on the layer index
    assert 0 < sum(da) < 200


class CountingComm(LocalComm):
    def __init__(self, n):
        super().__init__(n)
        self.calls = 0

    def exchange(self, *args):
        self.calls += 1
        return super().exchange(*args)


@pytest.mark.parametrize("with_padding", [False, True])
def test_gate_drop_round_robin_output(with_padding):
    E, M = 4, 5
    comm = CountingComm(E)
    layer = make_layer(E=E, M=M, mode="gate_drop", comm=comm)
    routed = []
    layer.router.register_forward_hook(lambda *a: routed.append(1))
    u = firing_update(0.5, 1, 3)
    layer.set_num_updates(u)
    layer.train()
    x = torch.randn(2, 7, M, dtype=torch.float64)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    if with_padding:
        pad[0, 5:] = True
        pad[1, 2] = True
    y = layer(x, pad if with_padding else None)
    assert routed == [] and comm.calls == 0  # no router, no all-to-all
    flat_x, flat_y, flat_pad = x.view(-1, M), y.view(-1, M), pad.view(-1)
    ex = layer.experts
    s = 0
    for row in range(flat_x.shape[0]):
        if flat_pad[row]:
            assert torch.all(flat_y[row] == 0)
            continue
        e = s % E  # token s (counting non-padding tokens) -> local expert s mod E, gate 1
        ref = ref_expert(flat_x[row], ex.w1[e], ex.b1[e], ex.w2[e], ex.b2[e])
        torch.testing.assert_close(flat_y[row], torch.tensor(ref, dtype=torch.float64))
        s += 1
    assert layer.aux.losses == {}  # no balance loss from a layer that did not route
    st = layer.aux.stats
    assert float(st.gating_dropped) == 1.0
    assert float(st.num_tokens) == s
    assert st.tokens_per_expert.tolist() == [len(range(e, s, E)) for e in range(E)]
    assert float(st.a2a_bytes) == 0.0
    y.sum().backward()  # the experts still train on dropped steps
    assert layer.experts.w1.grad is not None and layer.experts.w1.grad.abs().sum() > 0


def test_gate_expert_drop_outputs_zeros():
    E, M = 4, 5
    layer = make_layer(E=E, M=M, mode="gate_expert_drop", p=0.3, layer_index=0, seed=2)
    u = firing_update(0.3, 2, 0)
    layer.set_num_updates(u)
    layer.train()
    x = torch.randn(3, 4, M, dtype=torch.float64)
    y = layer(x)
    assert y.shape == x.shape and torch.all(y == 0)
    assert layer.aux.losses == {}
    assert float(layer.aux.stats.gating_dropped) == 1.0
    assert layer.aux.stats.tokens_per_expert.tolist() == [0] * E


@pytest.mark.parametrize("mode", ["gate_drop", "gate_expert_drop", "local_topk"])
def test_not_fired_step_and_eval_route_normally(mode):
    E, M = 4, 5
    layer = make_layer(E=E, M=M, mode=mode, p=0.5, layer_index=1, seed=3)
    ref = make_layer(E=E, M=M, mode=mode, p=0.0, layer_index=1, seed=3)  # same weights, no dropout
    x = torch.randn(10, M, dtype=torch.float64)
    layer.train(), ref.train()
    u = firing_update(0.5, 3, 1, fires=False)
    layer.set_num_updates(u)
    torch.testing.assert_close(layer(x), ref(x))
    assert float(layer.aux.stats.gating_dropped) == 0.0
    assert "balance" in layer.aux.losses
    # eval: never fires, even on updates where training would drop
    layer.eval(), ref.eval()
    layer.aux_mode = AuxMode.ALL  # statistics in evaluation, as validation asks for them
    fired = [u for u in range(200) if gating_dropout_fires(0.5, 3, u, 1)]
    assert fired
    for u in fired[:5]:
        layer.set_num_updates(u)
        assert not layer.gating_dropped()
        torch.testing.assert_close(layer(x), ref(x))
        assert float(layer.aux.stats.gating_dropped) == 0.0


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan")])
def test_bad_rate(bad):
    with pytest.raises(ValueError, match="--moe-gating-dropout"):
        check_rate(bad)
    with pytest.raises(ValueError, match="--moe-gating-dropout"):
        MoEConfig(gating_dropout=bad).validate()
    with pytest.raises(ValueError, match=r"^MoELayer: gating_dropout must be in \[0, 1\)"):  # its argument's name
        make_layer(p=bad)


def test_bad_mode():
    with pytest.raises(ValueError, match="--moe-gating-dropout-mode"):
        MoEConfig(gating_dropout=0.2, gating_dropout_mode="drop_all").validate()
    with pytest.raises(ValueError, match="^MoELayer: gating_dropout_mode must be one of"):
        make_layer(mode="gate-drop")


def test_config_built_layer_uses_rate_and_seed():
    cfg = MoEConfig(num_experts=4, router="top1", gating_dropout=0.3, seed=9)
    layer = build_moe_layer(cfg, 5, 6, layer_index=2)
    layer.train()
    got = []
    for u in range(100):
        layer.set_num_updates(u)
        got.append(layer.gating_dropped())
    assert got == [gating_dropout_fires(0.3, 9, u, 2) for u in range(100)]


# ------------------------------------------------------------------ local_topk
FP32_TOL = dict(rtol=1e-5, atol=1e-6)


class RankComm(LocalComm):
    """Rank `rank` of `world` ranks holding E / world experts each, without processes: enough
    for a local_topk dropped step, which must not call the communicator at all."""

    def __init__(self, num_experts, rank, world):
        super().__init__(num_experts)
        self.world_size, self.rank = world, rank
        self.num_local_experts = num_experts // world

    def local_expert_ids(self):
        return list(range(self.rank * self.num_local_experts, (self.rank + 1) * self.num_local_experts))

    def read_counts(self, *args):
        raise AssertionError("a local_topk dropped step read the counts through the communicator")

    def exchange(self, *args):
        raise AssertionError("a local_topk dropped step called the all-to-all")


def local_layer(router="top2", E=4, rank=1, world=2, M=5, F=6, cf=None, p=0.5, seed=4, **router_kw):
    """A double-precision local_topk layer of rank `rank` (experts [rank L, (rank + 1) L))
    whose update is a dropped one; router weights scaled up so that routing is far from ties."""
    torch.manual_seed(seed)
    comm = RankComm(E, rank, world)
    cls = {"top1": Top1Router, "top2": Top2Router}[router]
    r = cls(M, E, capacity_factor=cf, **router_kw)
    with torch.no_grad():
        r.wg.weight.mul_(4.0)
    layer = MoELayer(r, FFNExperts(comm.num_local_experts, M, F), layer_index=1, comm=comm, gating_dropout=p,
                     gating_dropout_mode="local_topk", seed=seed).double().train()
    layer.set_num_updates(firing_update(p, seed, 1))
    return layer


def ref_local_topk(x, w_router, experts, first, k, cf=None, balance_wt=0.01, z_wt=0.0):
    """Brute force, token by token: logits over all E experts with the other ranks' experts
    masked to -inf, softmax, the router's top-k (top1: argmax; top2 'all': argmax, then argmax of
    the rest), capacity k * ceil(cf S / L) over the L local experts in slot-major priority, the
    gates (top1: the probability; top2: the kept probabilities renormalised), the output
    sum gate * expert(x); and the router's losses over the L local experts only."""
    S, E = x.shape[0], w_router.shape[0]
    L = experts.w1.shape[0]
    allowed = torch.tensor([first <= e < first + L for e in range(E)])
    probs, choices, masked_logits = [], [], []
    for s in range(S):
        logits = torch.stack([x[s] @ w_router[e] for e in range(E)])
        masked = torch.where(allowed, logits, torch.full_like(logits, float("-inf")))
        p = torch.softmax(masked, dim=0)
        order = sorted(range(E), key=lambda e: -float(p[e].detach()))
        assert all(allowed[e] for e in order[:k])
        probs.append(p), choices.append(order[:k]), masked_logits.append(masked)
    capacity = None if cf is None else k * math.ceil(cf * S / L - 1e-9)
    keep, used = [[True] * k for _ in range(S)], [0] * E
    for j in range(k):
        for s in range(S):
            e = choices[s][j]
            if capacity is not None and used[e] >= capacity:
                keep[s][j] = False
            else:
                used[e] += 1
    out = []
    for s in range(S):
        gates = [probs[s][e] * keep[s][j] for j, e in enumerate(choices[s])]
        if k == 2:
            total = gates[0] + gates[1]
            gates = [g / total if float(total.detach()) > 0 else g * 0 for g in gates]
        row = torch.zeros_like(x[s])
        for j, e in enumerate(choices[s]):
            if keep[s][j]:
                i = e - first
                h = torch.relu(x[s] @ experts.w1[i] + experts.b1[i])
                row = row + gates[j] * (h @ experts.w2[i] + experts.b2[i])
        out.append(row)
    local = range(first, first + L)
    f = [sum(1 for s in range(S) if choices[s][0] == i) / S for i in local]
    P = [sum(probs[s][i] for s in range(S)) / S for i in local]
    # Switch: L * sum_i f_i P_i; GShard: L^2 * mean_i(me_i ce_i), the same sum: both over local experts
    losses = {"balance": balance_wt * L * sum(fi * Pi for fi, Pi in zip(f, P))}
    if z_wt:
        losses["z"] = z_wt * sum(torch.logsumexp(m, 0) ** 2 for m in masked_logits) / S
    dropped = sum(not v for row in keep for v in row)
    return torch.stack(out), losses, used, dropped


@pytest.mark.parametrize("router,cf,rank,extra", [
    ("top1", None, 1, dict(z_loss_weight=0.01)), ("top1", 0.5, 0, {}),
    ("top2", None, 1, dict(second_expert_policy="all")), ("top2", 0.75, 0, dict(second_expert_policy="all"))])
def test_local_topk_matches_brute_force(router, cf, rank, extra):
    E, M, S = 6, 5, 11
    layer = local_layer(router, E=E, rank=rank, world=3 if router == "top1" else 2, M=M, cf=cf, **extra)
    first, L = layer.comm.local_expert_ids()[0], layer.experts.num_local
    k = 1 if router == "top1" else 2
    g = torch.Generator().manual_seed(7)
    x = torch.randn(S, M, generator=g, dtype=torch.float64)
    target = torch.randn(S, M, generator=g, dtype=torch.float64)
    x1 = x.clone().requires_grad_(True)
    out = layer(x1)
    losses = layer.aux.losses
    (out * target).sum().add(sum(losses.values())).backward()
    params = [layer.router.wg.weight, *(getattr(layer.experts, n) for n in ("w1", "b1", "w2", "b2"))]
    grads = [x1.grad] + [p.grad.clone() for p in params]

    x2 = x.clone().requires_grad_(True)
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    ref_experts = type("Experts", (), dict(zip(("w1", "b1", "w2", "b2"), ref_params[1:])))
    ref_out, ref_losses, used, dropped = ref_local_topk(x2, ref_params[0], ref_experts, first, k, cf,
                                                        z_wt=extra.get("z_loss_weight", 0.0))
    (ref_out * target).sum().add(sum(ref_losses.values())).backward()
    # the router computes in fp32 (fp32_logits), the reference in float64
    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    assert set(losses) == set(ref_losses)
    for name in losses:
        torch.testing.assert_close(losses[name].double(), ref_losses[name].double(), **FP32_TOL)
    for got, want in zip(grads, [x2.grad] + [p.grad for p in ref_params]):
        torch.testing.assert_close(got, want, **FP32_TOL)
    # the other ranks' router rows take no part: exactly zero gradient there
    off_rank = [e for e in range(E) if not first <= e < first + L]
    assert torch.all(layer.router.wg.weight.grad[off_rank] == 0)
    assert layer.router.wg.weight.grad[first:first + L].abs().sum() > 0  # trained through the gates
    st = layer.aux.stats
    assert st.tokens_per_expert.tolist() == used
    assert float(st.gating_dropped) == 1.0 and float(st.a2a_bytes) == 0.0
    assert int(st.dropped_by_capacity) == dropped
    assert (dropped > 0) == (cf is not None)  # the capacity cases really drop
    assert float(st.requested_slots) == S * k


def test_local_topk_gradcheck():
    """torch.autograd.gradcheck of a dropped step (top2, capacity dropping) in x and the router
    weight; the router's logits are fp32, hence a finite-difference step and tolerance to match."""
    layer = local_layer("top2", E=4, rank=0, M=4, F=5, cf=0.75, second_expert_policy="all")
    x = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    w = layer.router.wg.weight.detach().clone().requires_grad_(True)

    def f(x, w):
        out = torch.func.functional_call(layer, {"router.wg.weight": w}, (x,))
        return out, layer.aux.losses["balance"]

    assert torch.autograd.gradcheck(f, (x, w), eps=1e-3, atol=2e-3, rtol=1e-2)
    assert int(layer.aux.stats.dropped_by_capacity) > 0


@pytest.mark.parametrize("router_kw", [dict(router="top1", jitter_eps=0.1, z_loss_weight=1e-3),
                                       dict(router="top2", second_expert_policy="sampling"),
                                       dict(router="top2", second_expert_policy="random"),
                                       dict(router="noisy_topk", top_k=3),
                                       dict(router="random", top_k_min=1, top_k_max=4, top_k_schedule_steps=8)],
                         ids=["top1", "top2_sampling", "top2_random", "noisy_topk", "random"])
def test_local_topk_in_one_process_is_a_routed_step(router_kw):
    """One process holds every expert: a dropped step is exactly a routed step (same noise and
    sampling draws, gates, losses); only moe_gating_dropped records the decision."""
    cfg = MoEConfig(num_experts=4, gating_dropout=0.5, gating_dropout_mode="local_topk", seed=6, **router_kw)
    torch.manual_seed(0)
    layer = build_moe_layer(cfg, 6, 8, layer_index=0).train()
    u = firing_update(0.5, 6, 0)
    layer.set_num_updates(u)
    if router_kw["router"] == "noisy_topk":
        torch.nn.init.normal_(layer.router.w_gate), torch.nn.init.normal_(layer.router.w_noise)
    x = torch.randn(9, 6)
    torch.manual_seed(1)
    y = layer(x)
    dropped_aux = layer.aux
    layer.gating_dropout = 0.0
    torch.manual_seed(1)
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
    assert dropped_aux.losses.keys() == layer.aux.losses.keys()
    for name in dropped_aux.losses:
        assert torch.equal(dropped_aux.losses[name], layer.aux.losses[name])
    assert float(dropped_aux.stats.gating_dropped) == 1.0 and float(layer.aux.stats.gating_dropped) == 0.0
    assert torch.equal(dropped_aux.stats.tokens_per_expert, layer.aux.stats.tokens_per_expert)


def test_local_topk_noisy_and_random_routers_restricted():
    """noisy_topk (noise, top-k, load loss) and the random router (its k schedule) restricted to
    a block = the per-token references of tests/test_routers.py on that block's weight rows."""
    from moe_fairseq.moe import KSchedule, NoisyTopKRouter, RandomRouter
    from test_routers import check, make_x, randomize_noisy, ref_logits, ref_noisy, softmax, topk_desc

    S, E, M, first, L = 12, 6, 5, 3, 3
    x = make_x(S, M, 5)
    noisy = NoisyTopKRouter(M, E, k=2, importance_loss_weight=0.1, load_loss_weight=0.3).train()
    randomize_noisy(noisy, 4)
    torch.manual_seed(11)
    with noisy.restricted_to(first, L):
        r = noisy(x)
    torch.manual_seed(11)
    noise = torch.randn(S, L).double().tolist()
    rows = slice(first, first + L)
    idx, gates, keep, imp, load, _ = ref_noisy(x, noisy.w_gate[rows], noisy.w_noise[rows], 2, noise=noise,
                                               w_imp=0.1, w_load=0.3)
    check(r, idx, gates, keep)
    torch.testing.assert_close(r.losses["importance"].double(), torch.tensor(imp, dtype=torch.float64), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(r.losses["load"].double(), torch.tensor(load, dtype=torch.float64), rtol=1e-4, atol=1e-7)

    rand = RandomRouter(M, E, KSchedule(1, 3, 4, "linear")).train()
    for t in (0, 2, 4):  # k = 1, 2, 3: the schedule, up to L
        rand.set_num_updates(t)
        k = rand.current_k()
        with rand.restricted_to(first, L):
            r = rand(x)
        logits = ref_logits(x, rand.weight[rows])
        idx = [topk_desc(row, k) for row in logits]
        check(r, idx, [softmax([row[i] for i in ch]) for row, ch in zip(logits, idx)], [[True] * k] * S)
    assert k == 3


def test_local_topk_refusals(toy_router):
    # k larger than the experts of a rank: refused by the config for the ranks, naming the flags
    cfg = MoEConfig(num_experts=2, router="top2", gating_dropout=0.3, gating_dropout_mode="local_topk")
    with pytest.raises(MoEUsageError) as err:
        cfg.check_world_size(2)
    assert str(err.value) == ("--moe-gating-dropout-mode local_topk routes each token to k=2 (--moe-router top2) of "
                              "its rank's experts, but --moe-expert-count=2 over 2 rank(s) leaves 1 per rank; use "
                              "gate_drop or more experts")
    cfg.check_world_size(1)
    with pytest.raises(MoEUsageError, match=r"^--moe-gating-dropout-mode local_topk routes each token to k=2"):
        build_moe_layer(cfg, 5, 6, comm=RankComm(2, 0, 2))  # where a config meets the ranks
    cfg = MoEConfig(num_experts=8, router="random", top_k_max=4, gating_dropout=0.3, gating_dropout_mode="local_topk")
    with pytest.raises(MoEUsageError, match=r"k=4 \(--moe-top-k-max\) .* --moe-expert-count=8 over 4 rank\(s\) leaves 2"):
        cfg.check_world_size(4)
    cfg.check_world_size(2)
    # ... and by the layer, in its arguments' names
    from moe_fairseq.moe import KSchedule, RandomRouter

    with pytest.raises(ValueError, match=r"^gating_dropout_mode local_topk: the router's k=2 exceeds the rank's 1 "):
        MoELayer(Top2Router(5, 2), FFNExperts(1, 5, 6), comm=RankComm(2, 0, 2), gating_dropout=0.3,
                 gating_dropout_mode="local_topk")
    with pytest.raises(ValueError, match=r"k=4 exceeds the rank's 2 local experts"):
        MoELayer(RandomRouter(5, 8, KSchedule(1, 4, 10)), FFNExperts(2, 5, 6), comm=RankComm(8, 1, 4),
                 gating_dropout=0.3, gating_dropout_mode="local_topk")
    # a router that cannot be restricted (tests/toy_router.py, registered by the fixture)
    with pytest.raises(MoEUsageError, match="--moe-router toy_round_robin cannot"):
        MoEConfig(num_experts=4, router="toy_round_robin", gating_dropout=0.3, gating_dropout_mode="local_topk")
    with pytest.raises(ValueError, match="^gating_dropout_mode local_topk needs a restrictable router, not RoundRobin"):
        MoELayer(toy_router(5, 4, 1), FFNExperts(4, 5, 6), gating_dropout=0.3, gating_dropout_mode="local_topk")
    # a mode set after construction (as scripts/step_timing.py does) meets the same rule in the router
    layer = MoELayer(Top2Router(5, 4), FFNExperts(1, 5, 6), comm=RankComm(4, 0, 4), gating_dropout=0.5).train()
    layer.gating_dropout_mode = "local_topk"
    layer.set_num_updates(firing_update(0.5, 1, 0))
    with pytest.raises(ValueError, match=r"k=2 \(--moe-router top2\) exceeds the 1 expert"):
        layer(torch.randn(4, 5))
    assert layer.router.restriction is None  # left unrestricted after the error
    MoEConfig(gating_dropout=0.3, gating_dropout_mode="local_topk").validate()
