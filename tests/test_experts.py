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
    with pytest.raises(ValueError, match=r"^FFNExperts: expert_dropout must be in \[0, 1\)"):
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


# --------------------------------------------------------------------------- GEMM modes
MODES = ["loop", "bmm", "grouped", "aligned"]
SPLITS = [[3, 0, 2, 4], [0, 0, 0, 5], [1, 0, 0, 0], [1, 1, 1, 1], [7, 1, 0, 2], [2, 3]]  # [2, 3]: fewer counts than experts


def brute_force(experts, x, counts, act=torch.relu):
    """Per-row float64 reference with autograd: act(x w1[e] + b1[e]) w2[e] + b2[e], row by row."""
    ps = {n: p.detach().double().clone().requires_grad_(True) for n, p in experts.named_parameters()}
    xr = x.detach().double().clone().requires_grad_(True)
    rows, row = [], 0
    for e, c in enumerate(counts):
        for _ in range(c):
            h = act(xr[row] @ ps["w1"][e] + ps["b1"][e])
            rows.append(h @ ps["w2"][e] + ps["b2"][e])
            row += 1
    return (torch.stack(rows) if rows else xr.new_zeros(0, x.shape[1])), xr, ps


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("counts", SPLITS)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_gemm_modes_against_brute_force(mode, counts, activation):
    """Forward and every gradient of each GEMM mode against the per-row float64 reference:
    empty experts, one row, uneven splits, fewer counts than experts.  torch._grouped_mm has no
    float64, so every mode runs in fp32 here (dims multiples of 4: its 16-byte strides)."""
    E, M, F = 4, 8, 12
    torch.manual_seed(0)
    experts = FFNExperts(E, M, F, activation=activation)
    experts.gemm = mode
    x = torch.randn(sum(counts), M, requires_grad=True)
    y = experts(x, counts)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu}[activation]
    ref, xr, ps = brute_force(experts, x, counts, act)
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(y.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-5, rtol=1e-5)
    for n, p in experts.named_parameters():
        torch.testing.assert_close(p.grad.double(), ps[n].grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"{n}: {m}")
    for e in range(E):  # an expert without rows gets exactly zero gradients
        if e >= len(counts) or counts[e] == 0:
            assert all(float(p.grad[e].abs().max()) == 0 for p in experts.parameters())


@pytest.mark.parametrize("mode", ["loop", "bmm", "aligned"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gemm_modes_gradcheck_float64(mode, dropout):
    E, M, F = 3, 3, 4
    torch.manual_seed(0)
    experts = FFNExperts(E, M, F, activation="silu", expert_dropout=dropout).double().train()
    experts.gemm = mode
    counts = [2, 0, 3]
    x = torch.randn(5, M, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in experts.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in experts.named_parameters()]

    def fn(x, *ps):
        torch.manual_seed(123)
        return torch.func.functional_call(experts, dict(zip(names, ps)), (x, counts))

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_gemm_modes_agree_with_each_other(dropout):
    """Same seed, same output and gradients in every mode, with expert dropout too (the mask is
    drawn over the N rows whatever the mode)."""
    E, M, F = 4, 8, 16
    counts = [5, 0, 1, 6]
    torch.manual_seed(0)
    experts = FFNExperts(E, M, F, expert_dropout=dropout).train()
    x0 = torch.randn(sum(counts), M)
    results = {}
    for mode in MODES:
        experts.gemm = mode
        experts.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(5)
        y = experts(x, counts)
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        results[mode] = [y, x.grad] + [p.grad for p in experts.parameters()]
    for mode in ("bmm", "grouped", "aligned"):
        for a, b in zip(results[mode], results["loop"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_gemm_modes_under_autocast_bf16(mode):
    """CPU autocast (bf16): every mode computes in bf16 and matches fp32 within bf16 precision;
    the fp32 weights get fp32 gradients."""
    E, M, F = 4, 16, 32
    counts = [3, 0, 5, 2]
    torch.manual_seed(0)
    experts = FFNExperts(E, M, F)
    experts.gemm = mode
    x0 = torch.randn(sum(counts), M)
    out = {}
    for amp in (False, True):
        experts.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = experts(x, counts)
        y.float().sum().backward()
        out[amp] = (y, x.grad, [p.grad for p in experts.parameters()])
    assert out[True][0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in out[True][2])
    for a, b in zip([out[True][0], out[True][1], *out[True][2]], [out[False][0], out[False][1], *out[False][2]]):
        err = float((a.float() - b).norm() / b.norm().clamp_min(1e-12))
        assert err < 1.5e-2
    assert float((out[True][0].float() - out[False][0]).abs().max()) > 0  # really rounded


def test_aligned_mode_layout():
    """Each expert's block starts at a multiple of ALIGN_ROWS and holds its rows first, then zero
    rows up to the next multiple; an empty expert has no block; unpad returns the rows."""
    from moe_fairseq.moe.experts import ALIGN_ROWS, _Groups

    A = ALIGN_ROWS
    counts = [3, 0, A + 1, A]
    n = sum(counts)
    groups = _Groups(counts, 4, n, torch.device("cpu"), "aligned")
    assert groups.groups == [(0, 0, A), (2, A, 2 * A), (3, 3 * A, A)]
    expected_pos = list(range(3)) + list(range(A, 2 * A + 1)) + list(range(3 * A, 4 * A))
    assert groups.pos.tolist() == expected_pos
    x = torch.arange(1, n + 1, dtype=torch.float32).unsqueeze(1)
    padded = groups.pad(x)
    assert padded.shape == (4 * A, 1)
    assert padded[expected_pos].squeeze(1).tolist() == x.squeeze(1).tolist()
    assert float(padded.sum()) == float(x.sum())  # every other row is zero
    torch.testing.assert_close(groups.unpad(padded), x)
    g = torch.ones(4 * A, 2)
    assert groups.bias_grad(g)[:, 0].tolist() == [A, 0, 2 * A, A]  # a block's rows, padding included


def test_grouped_mode_takes_counts_on_the_device():
    """Counts as a tensor (no host copy) give the same result as the host list."""
    E, M, F = 4, 8, 12
    counts = [3, 0, 2, 4]
    torch.manual_seed(0)
    experts = FFNExperts(E, M, F)
    experts.gemm = "grouped"
    x = torch.randn(sum(counts), M)
    torch.testing.assert_close(experts(x, torch.tensor(counts)), experts(x, counts))
    experts.gemm = "loop"  # any other mode reads the tensor on the host
    torch.testing.assert_close(experts(x, torch.tensor(counts)), experts(x, counts))


def test_auto_mode_rule_and_bad_mode():
    from moe_fairseq.moe.experts import BMM_MAX_PAD_ROWS, BMM_MAX_PAD_SHARE
    from moe_fairseq.moe.errors import MoEUsageError

    experts = FFNExperts(4, 8, 12)
    cpu = torch.device("cpu")
    assert experts.gemm == "auto"
    assert BMM_MAX_PAD_ROWS == 10 and BMM_MAX_PAD_SHARE == 0.3
    assert experts.gemm_mode(cpu, torch.float32, [2, 2, 2, 2]) == "bmm"  # no padding
    assert experts.gemm_mode(cpu, torch.float32, [4, 3, 3, 3]) == "bmm"  # 3 padding rows <= 0.3 x 13
    assert experts.gemm_mode(cpu, torch.float32, [5, 3, 3, 3]) == "loop"  # 6 > 0.3 x 14: few rows, much padding
    assert experts.gemm_mode(cpu, torch.float32, [11, 1, 1, 1]) == "loop"  # 30 rows = 7.5 per expert, but > 0.3 x 14
    assert experts.gemm_mode(cpu, torch.float32, [110, 100, 100, 100]) == "bmm"  # 30 = 7.5 per expert, <= 0.3 x 410
    assert experts.gemm_mode(cpu, torch.float32, [115, 100, 100, 100]) == "loop"  # 45 > 10 per expert
    assert experts.gemm_mode(cpu, torch.float32, [15, 1, 1, 1]) == "loop"  # 42 > 10 per expert
    assert experts.gemm_mode(cpu, torch.float32, [8, 0, 1, 1]) == "loop"  # an empty expert: the loop skips it
    assert experts.gemm_mode(cpu, torch.float32, [2, 2, 2]) == "loop"  # fewer counts than experts
    # half precision on CPU: the aligned loop, whatever the padding (oneDNN builds a kernel per shape)
    for dtype in (torch.bfloat16, torch.float16):
        for counts in ([2, 2, 2, 2], [5, 3, 3, 3], [8, 0, 1, 1], [2, 2, 2]):
            assert experts.gemm_mode(cpu, dtype, counts) == "aligned"
    assert not experts.takes_device_counts(cpu, torch.float32)  # on CPU the host copy is free
    experts.gemm = "grouped"
    assert experts.takes_device_counts(cpu, torch.float32)
    with pytest.raises(MoEUsageError, match="torch._grouped_mm"):
        experts.gemm_mode(cpu, torch.float64, [1, 1, 1, 1])
    with pytest.raises(MoEUsageError, match="torch._grouped_mm"):
        e2 = FFNExperts(2, 5, 12)
        e2.gemm = "grouped"
        e2.gemm_mode(cpu, torch.float32, [1, 1])  # 5 floats = 20 bytes: not 16-byte strides
    experts.gemm = "fast"
    with pytest.raises(MoEUsageError, match="FFNExperts.gemm must be one of"):
        experts(torch.randn(2, 8), [1, 1, 0, 0])
