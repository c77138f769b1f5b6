"""Gating Dropout: firing rate, determinism across processes, and the two dropped-step modes."""
import math
import os
import subprocess
import sys

import pytest
import torch

from moe_fairseq.moe import FFNExperts, MoEConfig, MoELayer, Top2Router, build_moe_layer
from moe_fairseq.moe.comm import LocalComm
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


@pytest.mark.parametrize("mode", ["gate_drop", "gate_expert_drop"])
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
    layer.eval_aux = True  # statistics in evaluation, as validation asks for them
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
    with pytest.raises(ValueError, match="--moe-gating-dropout"):
        make_layer(p=bad)


def test_bad_mode():
    with pytest.raises(ValueError, match="--moe-gating-dropout-mode"):
        MoEConfig(gating_dropout=0.2, gating_dropout_mode="drop_all").validate()
    with pytest.raises(ValueError, match="--moe-gating-dropout-mode"):
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
