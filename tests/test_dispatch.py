"""Index-based dispatch / combine against brute-force loops, and float64 gradchecks with a fixed Routing."""
import pytest
import torch

from moe_fairseq.moe.dispatch import combine, dispatch, plan_dispatch
from moe_fairseq.moe.experts import FFNExperts

pytestmark = pytest.mark.usefixtures("one_thread")


def random_routing(S, E, k, seed, drop=0.3):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(E, generator=g)[:k] for _ in range(S)]
    idx = torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.long)
    keep = torch.rand(S, k, generator=g) > drop
    gate = torch.rand(S, k, generator=g, dtype=torch.float64) * keep
    return idx, keep, gate


def ref_plan(idx, keep, gate, E):
    S, k = idx.shape
    token_index, gates, counts = [], [], []
    for e in range(E):
        c = 0
        for t in range(S):  # within an expert: token order, then slot order (stable)
            for j in range(k):
                if bool(keep[t, j]) and int(idx[t, j]) == e:
                    token_index.append(t)
                    gates.append(float(gate[t, j]))
                    c += 1
        counts.append(c)
    return token_index, gates, counts


def ref_expert(x_row, w1, b1, w2, b2):
    """One expert on one token by explicit sums: relu(x w1 + b1) w2 + b2."""
    x_row, w1, b1, w2, b2 = (t.detach() for t in (x_row, w1, b1, w2, b2))
    M, F = w1.shape
    h = [max(0.0, sum(float(x_row[m]) * float(w1[m, f]) for m in range(M)) + float(b1[f])) for f in range(F)]
    return [sum(h[f] * float(w2[f, m]) for f in range(F)) + float(b2[m]) for m in range(M)]


@pytest.mark.parametrize("S,E,k", [(5, 3, 1), (12, 4, 2), (30, 6, 3), (9, 5, 5), (0, 3, 2)])
def test_plan_matches_reference(S, E, k):
    idx, keep, gate = random_routing(S, E, k, S + E + k)
    plan = plan_dispatch(idx, keep, gate, E)
    tok, gates, counts = ref_plan(idx, keep, gate, E)
    assert plan.token_index.tolist() == tok
    assert plan.counts.tolist() == counts
    assert plan.counts_list == counts
    torch.testing.assert_close(plan.gate, torch.tensor(gates, dtype=torch.float64))
    x = torch.randn(S, 4, dtype=torch.float64)
    d = dispatch(x, plan)
    assert d.shape == (sum(counts), 4)
    for n, t in enumerate(tok):
        assert torch.equal(d[n], x[t])


@pytest.mark.parametrize("S,E,k", [(5, 3, 1), (12, 4, 2), (30, 6, 3)])
def test_combine_matches_reference(S, E, k):
    idx, keep, gate = random_routing(S, E, k, 7 * S + k)
    plan = plan_dispatch(idx, keep, gate, E)
    M = 3
    # expert output of slot n: an arbitrary row (not a function of the token, to catch mix-ups)
    expert_out = torch.randn(len(plan.token_index), M, dtype=torch.float64)
    got = combine(expert_out, plan, S)
    ref = torch.zeros(S, M, dtype=torch.float64)
    tok, gates, _ = ref_plan(idx, keep, gate, E)
    for n, (t, g) in enumerate(zip(tok, gates)):
        for m in range(M):
            ref[t, m] += g * float(expert_out[n, m])
    torch.testing.assert_close(got, ref)


def test_dispatch_experts_combine_matches_per_token_loop():
    S, E, k, M, F = 14, 4, 2, 5, 6
    idx, keep, gate = random_routing(S, E, k, 3)
    torch.manual_seed(0)
    experts = FFNExperts(E, M, F).double()
    x = torch.randn(S, M, dtype=torch.float64)
    plan = plan_dispatch(idx, keep, gate, E)
    y = combine(experts(dispatch(x, plan), plan.counts_list), plan, S)
    for t in range(S):
        ref = [0.0] * M
        for j in range(k):
            if keep[t, j]:
                e = int(idx[t, j])
                out = ref_expert(x[t], experts.w1[e], experts.b1[e], experts.w2[e], experts.b2[e])
                ref = [a + float(gate[t, j]) * b for a, b in zip(ref, out)]
        torch.testing.assert_close(y[t], torch.tensor(ref, dtype=torch.float64))


def test_dispatch_combine_gradcheck_float64():
    """Fixed routing (expert ids, keep); gradients w.r.t. tokens, gates and expert weights."""
    S, E, k, M, F = 7, 3, 2, 3, 4
    idx, keep, gate = random_routing(S, E, k, 11, drop=0.25)
    torch.manual_seed(1)
    experts = FFNExperts(E, M, F).double()
    x = torch.randn(S, M, dtype=torch.float64, requires_grad=True)
    gate = gate.clone().requires_grad_(True)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in experts.named_parameters()}
    names = list(params)

    def fn(x, gate, *ps):
        plan = plan_dispatch(idx, keep, gate, E)
        out = torch.func.functional_call(experts, dict(zip(names, ps)), (dispatch(x, plan), plan.counts_list))
        return combine(out, plan, S)

    assert torch.autograd.gradcheck(fn, (x, gate, *params.values()))


def test_capacity_formula_is_exact_despite_float_rounding():
    from moe_fairseq.moe.capacity import expert_capacity

    assert expert_capacity(50, 1, 1, 1.1) == 55  # 1.1 * 50 is 55.000000000000007 in floats
    assert expert_capacity(2048, 16, 2, 1.0) == 256  # GShard: 2 * ceil(S / E)
    assert expert_capacity(10, 3, 1, 1.0) == 4  # Switch: ceil(cf * S / E)
    assert expert_capacity(10, 4, 1, 1.25) == 4  # ceil(3.125)
