"""FFNExperts against per-token loops; split_dense reproduces the dense FFN."""
import math

import pytest
import torch
import torch.nn as nn

from moe_fairseq.moe.experts import FFNExperts

pytestmark = pytest.mark.usefixtures("one_thread")


def ref_expert(x_row, w1, b1, w2, b2, act=lambda v: max(0.0, v)):
    x_row, w1, b1, w2, b2 = (t.detach() for t in (x_row, w1, b1, w2, b2))
    M, F = w1.shape
    h = [act(sum(float(x_row[m]) * float(w1[m, f]) for m in range(M)) + float(b1[f])) for f in range(F)]
    return [sum(h[f] * float(w2[f, m]) for f in range(F)) + float(b2[m]) for m in range(M)]


@pytest.mark.parametrize("counts", [[3, 0, 2, 4], [0, 0, 0, 5], [1, 1, 1, 1], [0, 0, 0, 0]])
def test_experts_forward_per_row(counts):
    E, M, F = 4, 5, 6
    torch.manual_seed(0)
    experts = FFNExperts(E, M, F).double()
    x = torch.randn(sum(counts), M, dtype=torch.float64)
    y = experts(x, counts)
    assert y.shape == (sum(counts), M)
    row = 0
    for e, c in enumerate(counts):
        for _ in range(c):
            ref = ref_expert(x[row], experts.w1[e], experts.b1[e], experts.w2[e], experts.b2[e])
            torch.testing.assert_close(y[row], torch.tensor(ref, dtype=torch.float64))
            row += 1


def test_experts_empty_input_keeps_graph():
    experts = FFNExperts(3, 4, 5)
    y = experts(torch.zeros(0, 4), [0, 0, 0])
    assert y.shape == (0, 4)
    y.sum().backward()  # must not fail: every rank runs backward through its experts


def test_expert_parameters_marked():
    experts = FFNExperts(2, 3, 4)
    assert len(list(experts.parameters())) == 4
    assert all(getattr(p, "expert", False) for p in experts.parameters())


def test_expert_dropout_only_in_training():
    torch.manual_seed(0)
    experts = FFNExperts(2, 4, 64, expert_dropout=0.5)
    x = torch.randn(6, 4)
    experts.eval()
    ref = FFNExperts(2, 4, 64)
    ref.load_state_dict(experts.state_dict())
    torch.testing.assert_close(experts(x, [3, 3]), ref(x, [3, 3]))
    experts.train()
    assert not torch.allclose(experts(x, [3, 3]), ref(x, [3, 3]))


@pytest.mark.parametrize("E,M,H", [(1, 4, 6), (2, 5, 8), (4, 6, 16), (8, 3, 8)])
def test_split_dense_reproduces_dense_ffn(E, M, H):
    torch.manual_seed(E + M)
    fc1, fc2 = nn.Linear(M, H).double(), nn.Linear(H, M).double()
    experts = FFNExperts.split_dense(fc1, fc2, E).double()
    assert experts.hidden_dim == H // E
    S = 7
    x = torch.randn(S, M, dtype=torch.float64)
    dense = fc2(torch.relu(fc1(x)))
    # every token to every expert with gate 1: sum of the E expert outputs
    y = experts(x.repeat(E, 1), [S] * E).view(E, S, M).sum(0)
    torch.testing.assert_close(y, dense)
    # the parameter count equals the dense FFN's, up to the per-expert copies of fc2's bias
    dense_count = sum(p.numel() for p in (*fc1.parameters(), *fc2.parameters()))
    assert sum(p.numel() for p in experts.parameters()) == dense_count + (E - 1) * M
    # expert e holds hidden units e*H/E ... (e+1)*H/E of the dense FFN (per-token check, expert 0)
    h = H // E
    for e in (0, E - 1):
        ref = []
        for t in range(2):
            hid = [max(0.0, float(fc1.weight[e * h + f] @ x[t]) + float(fc1.bias[e * h + f])) for f in range(h)]
            ref.append([sum(hid[f] * float(fc2.weight[m, e * h + f]) for f in range(h)) + float(fc2.bias[m]) / E
                        for m in range(M)])
        torch.testing.assert_close(experts(x[:2], [2 if i == e else 0 for i in range(E)]),
                                   torch.tensor(ref, dtype=torch.float64))


def test_split_dense_bad_input():
    with pytest.raises(ValueError, match="--moe-expert-count"):
        FFNExperts.split_dense(nn.Linear(4, 6), nn.Linear(6, 4), 4)
    with pytest.raises(ValueError, match="--activation-fn"):
        FFNExperts(2, 4, 4, activation="swish2")
    with pytest.raises(ValueError, match="--moe-expert-dropout"):
        FFNExperts(2, 4, 4, expert_dropout=1.0)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_experts_gradcheck_float64(activation, dropout):
    """The grouped forward/backward against finite differences, every activation, with and
    without expert dropout (the dropout mask is made identical across calls by reseeding)."""
    E, M, F = 3, 3, 4
    torch.manual_seed(0)
    experts = FFNExperts(E, M, F, activation=activation, expert_dropout=dropout).double()
    experts.train()
    counts = [2, 0, 3]
    x = torch.randn(5, M, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in experts.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in experts.named_parameters()]

    def fn(x, *ps):
        torch.manual_seed(123)
        return torch.func.functional_call(experts, dict(zip(names, ps)), (x, counts))

    assert torch.autograd.gradcheck(fn, (x, *params))
    if dropout == 0.0:  # forward against the per-row reference with this activation
        act = {"relu": lambda v: max(0.0, v), "gelu": lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))),
               "silu": lambda v: v / (1 + math.exp(-v)), "tanh": math.tanh}[activation]
        y = experts(x, counts)
        for row, e in enumerate([0, 0, 2, 2, 2]):
            ref = ref_expert(x[row], experts.w1[e], experts.b1[e], experts.w2[e], experts.b2[e], act)
            torch.testing.assert_close(y[row].detach(), torch.tensor(ref, dtype=torch.float64))
    else:  # dropout really changes the output in training, and only then
        experts.eval()
        ref = experts(x, counts).detach()
        experts.train()
        assert not torch.allclose(experts(x, counts), ref)


def test_expert_init_does_not_depend_on_the_world_size():
    """Global expert g starts from the same weights whether a rank holds all experts or a
    shard, and different experts start different (seeded per (seed, layer, g))."""
    from moe_fairseq.moe import MoEConfig, build_moe_layer
    from moe_fairseq.moe.comm import LocalComm

    class SecondHalf(LocalComm):  # what rank 1 of 2 holds
        def __init__(self):
            super().__init__(4)
            self.num_local_experts = 2

        def local_expert_ids(self):
            return [2, 3]

    full = build_moe_layer(MoEConfig(num_experts=4, seed=5), 8, 16, layer_index=1)
    shard = build_moe_layer(MoEConfig(num_experts=4, seed=5), 8, 16, layer_index=1, comm=SecondHalf())
    for name in ("w1", "b1", "w2", "b2"):
        assert torch.equal(getattr(full.experts, name)[2:], getattr(shard.experts, name))
    assert not torch.equal(full.experts.w1[0], full.experts.w1[1])
    other_layer = build_moe_layer(MoEConfig(num_experts=4, seed=5), 8, 16, layer_index=2)
    assert not torch.equal(full.experts.w1, other_layer.experts.w1)
