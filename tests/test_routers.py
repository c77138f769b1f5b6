"""Every router against an independent per-token reference (float64 Python loops).

The references never call the code under test: logits, softmax, top-k, capacity priority and
the losses are recomputed here from the router weights, one token at a time.  Routers compute
their logits in fp32, so gates are compared with a tolerance; expert ids and keep masks must
match exactly (inputs are random, so near-ties have probability ~0 for the fixed seeds).
"""
import math

import pytest
import torch

from moe_fairseq.moe import KSchedule, NoisyTopKRouter, RandomRouter, Top1Router, Top2Router
from moe_fairseq.moe.errors import MoEUsageError
from moe_fairseq.moe.routers import ROUTERS, SECOND_EXPERT_POLICIES

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 2e-5


# --------------------------------------------------------------------------- references
def ref_logits(x, w):
    """(S, M) x (E, M) -> list of S lists of E float64 logits, by explicit sums."""
    xs, ws = x.double().tolist(), w.double().tolist()
    return [[sum(a * b for a, b in zip(row, wrow)) for wrow in ws] for row in xs]


def softmax(values):
    m = max(values)
    ex = [math.exp(v - m) for v in values]
    s = sum(ex)
    return [v / s for v in ex]


def argmax(values, exclude=()):
    best, best_i = -math.inf, None
    for i, v in enumerate(values):
        if i in exclude:
            continue
        if v > best:
            best, best_i = v, i
    return best_i


def topk_desc(values, k):
    return sorted(range(len(values)), key=lambda i: -values[i])[:k]


def ref_capacity(expert_index, keep, num_experts, capacity):
    """Slot-major priority (all first choices, then all second choices), token order within a slot;
    slots already not kept use no capacity.  capacity None: keep everything."""
    if capacity is None:
        return [list(r) for r in keep]
    S, k = len(expert_index), len(expert_index[0]) if expert_index else 0
    used = [0] * num_experts
    out = [[False] * k for _ in range(S)]
    for j in range(k):
        for t in range(S):
            if keep[t][j]:
                e = expert_index[t][j]
                if used[e] < capacity:
                    used[e] += 1
                    out[t][j] = True
    return out


def ref_cap(cf, S, E, k):
    return None if cf is None else k * math.ceil(cf * S / E)


def ref_cv2(values):
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / n
    return var / (mean ** 2 + 1e-10)


def phi(z):
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def check(routing, ref_idx, ref_gate, ref_keep, atol=ATOL):
    assert routing.expert_index.dtype == torch.long
    assert routing.keep.dtype == torch.bool
    assert routing.expert_index.tolist() == ref_idx
    assert routing.keep.tolist() == ref_keep
    torch.testing.assert_close(routing.gate.double(), torch.tensor(ref_gate, dtype=torch.float64),
                               atol=atol, rtol=0)


def skewed_weight(router_weight, generator_seed=0, boost=1.5):
    """Random router weights plus a bias towards expert 0 (through a constant input feature),
    so that capacity really drops tokens."""
    g = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        router_weight.copy_(torch.randn(router_weight.shape, generator=g))
        router_weight[0, 0] += boost
    return router_weight


def make_x(S, M, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, M, generator=g)
    x[:, 0] = 1.0 + 0.1 * x[:, 0]  # a near-constant feature for the skew above
    return x


# --------------------------------------------------------------------------- top-1 (Switch)
def ref_top1(x, w, cf, alpha=0.0, x_router=None):
    S, E = x.shape[0], w.shape[0]
    logits = ref_logits(x if x_router is None else x_router, w)
    idx, gate = [], []
    for t in range(S):
        p = softmax(logits[t])
        e = argmax(p)
        idx.append([e])
        gate.append(p[e])
    keep = ref_capacity(idx, [[True]] * S, E, ref_cap(cf, S, E, 1))
    gates = [[gate[t] if keep[t][0] else 0.0] for t in range(S)]
    # balance loss alpha * E * sum_i f_i P_i
    f = [sum(1 for t in range(S) if idx[t][0] == i) / S for i in range(E)]
    P = [sum(softmax(logits[t])[i] for t in range(S)) / S for i in range(E)]
    bal = alpha * E * sum(f[i] * P[i] for i in range(E))
    return idx, gates, keep, bal, logits


@pytest.mark.parametrize("S,E,M", [(5, 3, 4), (23, 4, 6), (40, 6, 8)])
@pytest.mark.parametrize("cf,eval_cf,training", [
    (1.0, 2.0, True), (0.5, 2.0, True), (1.25, 2.0, True),  # training capacity
    (0.5, 2.0, False), (0.5, 0.75, False),                   # eval capacity factor in eval mode
    (None, None, True), (None, None, False),                 # dropless
])
def test_top1_matches_reference(S, E, M, cf, eval_cf, training):
    router = Top1Router(M, E, capacity_factor=cf, eval_capacity_factor=eval_cf, balance_loss_weight=0.01)
    skewed_weight(router.wg.weight, S + E)
    router.train(training)
    x = make_x(S, M, seed=S * 7 + E)
    r = router(x)
    used_cf = cf if training else eval_cf
    idx, gates, keep, bal, _ = ref_top1(x, router.wg.weight, used_cf, alpha=0.01)
    check(r, idx, gates, keep)
    n_dropped = sum(1 for row in keep if not row[0])
    assert int(r.dropped_by_capacity) == n_dropped
    # dropped tokens get gate exactly 0
    assert torch.all(r.gate[~r.keep] == 0)
    torch.testing.assert_close(r.losses["balance"].double(), torch.tensor(bal, dtype=torch.float64),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r.probs.double().sum(1), torch.ones(S, dtype=torch.float64))


def test_top1_capacity_really_drops_and_eval_factor_used():
    S, E, M = 32, 4, 6
    router = Top1Router(M, E, capacity_factor=0.5, eval_capacity_factor=2.0)
    skewed_weight(router.wg.weight, 3, boost=3.0)
    x = make_x(S, M, 5)
    router.train()
    r_train = router(x)
    router.eval()
    r_eval = router(x)
    # With C = ceil(0.5 * 32 / 4) = 4 in training the skewed expert 0 overflows ...
    assert int(r_train.dropped_by_capacity) > 0
    assert int(r_train.keep[:, 0].sum()) <= E * 4
    counts = torch.bincount(r_train.expert_index[r_train.keep], minlength=E)
    assert counts.max().item() <= 4
    # ... while in eval C = ceil(2 * 32 / 4) = 16.
    counts_eval = torch.bincount(r_eval.expert_index[r_eval.keep], minlength=E)
    assert counts_eval.max().item() <= 16
    assert int(r_eval.dropped_by_capacity) < int(r_train.dropped_by_capacity)
    # Earliest tokens win within an expert: the kept tokens of each expert are a prefix.
    for e in range(E):
        rows = (r_train.expert_index[:, 0] == e).nonzero().squeeze(1).tolist()
        kept = [bool(r_train.keep[t, 0]) for t in rows]
        assert kept == [True] * min(4, len(rows)) + [False] * max(0, len(rows) - 4)


def test_top1_jitter_reproduced_and_z_loss():
    S, E, M, eps = 17, 5, 6, 0.1
    router = Top1Router(M, E, capacity_factor=1.0, z_loss_weight=1e-3, jitter_eps=eps, balance_loss_weight=0.02)
    skewed_weight(router.wg.weight, 11)
    x = make_x(S, M, 9)
    torch.manual_seed(1234)
    r = router(x)
    torch.manual_seed(1234)
    u = torch.empty_like(x).uniform_(1 - eps, 1 + eps)
    idx, gates, keep, bal, logits = ref_top1(x, router.wg.weight, 1.0, alpha=0.02, x_router=x * u)
    check(r, idx, gates, keep)
    z = 1e-3 * sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / S
    torch.testing.assert_close(r.losses["z"].double(), torch.tensor(z, dtype=torch.float64), atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(r.losses["balance"].double(), torch.tensor(bal, dtype=torch.float64), atol=1e-7, rtol=1e-5)
    # no jitter in eval mode: routing equals the clean reference
    router.eval()
    r_eval = router(x)
    idx, gates, keep, _, _ = ref_top1(x, router.wg.weight, 2.0)
    check(r_eval, idx, gates, keep)


# --------------------------------------------------------------------------- top-2 (GShard)
def ref_top2(x, w, cf, normalize_before, second_scores=None, random_u=None):
    """second_scores: per-token scores for choosing expert 2 (logits, or logits + Gumbel);
    random_u: per-token uniforms of the `random` policy (keep 2nd iff 2 * g2 > u)."""
    S, E = x.shape[0], w.shape[0]
    logits = ref_logits(x, w)
    idx, raw, keep0 = [], [], []
    for t in range(S):
        p = softmax(logits[t])
        e1 = argmax(p)
        scores = logits[t] if second_scores is None else second_scores[t]
        e2 = argmax(scores, exclude=(e1,))
        idx.append([e1, e2])
        raw.append([p[e1], p[e2]])
        # `random` (as fairseq): 2 * g2 > u with g2 normalised first if normalize_before
        g2 = p[e2] / (p[e1] + p[e2]) if normalize_before else p[e2]
        keep0.append([True, True if random_u is None else (2 * g2 > random_u[t])])
    keep = ref_capacity(idx, keep0, E, ref_cap(cf, S, E, 2))
    gates = []
    for t in range(S):
        g1, g2 = raw[t]
        if normalize_before:
            s = g1 + g2
            g1, g2 = g1 / s, g2 / s
        g1, g2 = g1 * keep[t][0], g2 * keep[t][1]
        if not normalize_before:
            s = g1 + g2
            if s > 0:
                g1, g2 = g1 / s, g2 / s
        gates.append([g1, g2])
    me = [sum(softmax(logits[t])[i] for t in range(S)) / S for i in range(E)]
    ce = [sum(1 for t in range(S) if idx[t][0] == i) / S for i in range(E)]
    bal = E * E * sum(me[i] * ce[i] for i in range(E)) / E
    n_dropped = sum(keep0[t][j] and not keep[t][j] for t in range(S) for j in range(2))
    return idx, gates, keep, bal, n_dropped


@pytest.mark.parametrize("S,E,M", [(6, 2, 4), (21, 4, 6), (40, 6, 8)])
@pytest.mark.parametrize("cf,training", [(1.0, True), (0.5, True), (0.5, False), (None, True)])
@pytest.mark.parametrize("normalize_before", [False, True])
def test_top2_all_policy(S, E, M, cf, training, normalize_before):
    router = Top2Router(M, E, capacity_factor=cf, eval_capacity_factor=cf, second_expert_policy="all",
                        normalize_gate_prob_before_dropping=normalize_before, balance_loss_weight=1.0)
    skewed_weight(router.wg.weight, S * E)
    router.train(training)
    x = make_x(S, M, S + 100 * E)
    r = router(x)
    idx, gates, keep, bal, n_dropped = ref_top2(x, router.wg.weight, cf, normalize_before)
    check(r, idx, gates, keep)
    assert int(r.dropped_by_capacity) == n_dropped
    assert torch.all(r.expert_index[:, 0] != r.expert_index[:, 1])
    torch.testing.assert_close(r.losses["balance"].double(), torch.tensor(bal, dtype=torch.float64),
                               atol=1e-6, rtol=1e-5)
    sums = r.gate.double().sum(1)
    if not normalize_before:
        # renormalised after dropping: 1 if anything is kept, else 0
        torch.testing.assert_close(sums, r.keep.any(1).double(), atol=1e-6, rtol=0)
    else:
        both = r.keep.all(1)
        torch.testing.assert_close(sums[both], torch.ones(int(both.sum()), dtype=torch.float64), atol=1e-6, rtol=0)
        assert torch.all(sums[~both] < 1 - 1e-7) or not (~both).any()


def test_top2_capacity_is_2_ceil_s_over_e_and_drops():
    S, E, M = 24, 4, 6
    router = Top2Router(M, E, capacity_factor=1.0, second_expert_policy="all")
    skewed_weight(router.wg.weight, 7, boost=3.0)
    r = router(make_x(S, M, 3))
    C = 2 * math.ceil(S / E)
    counts = torch.bincount(r.expert_index[r.keep], minlength=E)
    assert counts.max().item() == C  # the skewed expert is full ...
    assert int(r.dropped_by_capacity) > 0  # ... and overflows


@pytest.mark.parametrize("normalize_before", [False, True])
def test_top2_sampling_policy_reproduced(normalize_before):
    S, E, M = 30, 5, 6
    router = Top2Router(M, E, capacity_factor=1.0, second_expert_policy="sampling",
                        normalize_gate_prob_before_dropping=normalize_before)
    skewed_weight(router.wg.weight, 21)
    x = make_x(S, M, 4)
    router.train()
    torch.manual_seed(77)
    r = router(x)
    torch.manual_seed(77)
    u = torch.rand(S, E).double().clamp_min(1e-20)
    gumbel = -torch.log((-torch.log(u)).clamp_min(1e-20))
    logits = ref_logits(x, router.wg.weight)
    scores = [[logits[t][e] + float(gumbel[t, e]) for e in range(E)] for t in range(S)]
    idx, gates, keep, _, n_dropped = ref_top2(x, router.wg.weight, 1.0, normalize_before, second_scores=scores)
    check(r, idx, gates, keep)
    assert int(r.dropped_by_capacity) == n_dropped
    assert torch.all(r.expert_index[:, 0] != r.expert_index[:, 1])
    # the Gumbel noise must actually change some second choices relative to plain argmax
    plain, *_ = ref_top2(x, router.wg.weight, 1.0, normalize_before)
    assert any(a[1] != b[1] for a, b in zip(idx, plain))
    # in eval mode there is no noise: second expert = plain second argmax, capacity at eval cf
    router.eval()
    r_eval = router(x)
    idx, gates, keep, _, _ = ref_top2(x, router.wg.weight, 2.0, normalize_before)
    check(r_eval, idx, gates, keep)


@pytest.mark.parametrize("normalize_before", [False, True])
def test_top2_random_policy_reproduced(normalize_before):
    S, E, M = 40, 4, 6
    router = Top2Router(M, E, capacity_factor=1.0, second_expert_policy="random",
                        normalize_gate_prob_before_dropping=normalize_before)
    skewed_weight(router.wg.weight, 5, boost=0.5)
    with torch.no_grad():
        router.wg.weight.mul_(0.3)  # flatter probabilities: second choices with sizeable g2
    x = make_x(S, M, 8)
    torch.manual_seed(5)
    r = router(x)
    torch.manual_seed(5)
    u = torch.rand(S).tolist()
    idx, gates, keep, _, n_dropped = ref_top2(x, router.wg.weight, 1.0, normalize_before, random_u=u)
    check(r, idx, gates, keep)
    if normalize_before:  # the test is sensitive to which g2 (raw or normalised) is compared with u
        _, _, keep_raw, _, _ = ref_top2(x, router.wg.weight, 1.0, False, random_u=u)
        assert keep_raw != keep
    assert int(r.dropped_by_capacity) == n_dropped  # slots dropped by the policy are not "capacity" drops
    # the policy really drops some second choices, and the first choice is then kept alone
    assert not r.keep[:, 1].all()
    if not normalize_before:
        only_first = r.keep[:, 0] & ~r.keep[:, 1]
        assert only_first.any()
        torch.testing.assert_close(r.gate[only_first, 0].double(),
                                   torch.ones(int(only_first.sum()), dtype=torch.float64), atol=1e-6, rtol=0)
    # eval: deterministic, every second choice is a candidate
    router.eval()
    r_eval = router(x)
    idx, gates, keep, _, _ = ref_top2(x, router.wg.weight, 2.0, normalize_before)
    check(r_eval, idx, gates, keep)


def test_top2_random_policy_keep_rate_statistics():
    """keep 2nd iff 2 * g2 > U(0,1): over many tokens, the keep rate is mean(min(1, 2 g2))."""
    S, E, M = 4000, 4, 6
    router = Top2Router(M, E, capacity_factor=None, second_expert_policy="random")
    x = torch.randn(S, M, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    r = router(x)
    p2 = torch.softmax(x.double() @ router.wg.weight.detach().double().t(), -1).gather(1, r.expert_index[:, 1:]).squeeze(1)
    expected = torch.clamp(2 * p2, max=1.0)
    rate = r.keep[:, 1].double().mean()
    sigma = math.sqrt(float((expected * (1 - expected)).sum())) / S
    assert abs(float(rate - expected.mean())) < 4 * sigma + 1e-9


# --------------------------------------------------------------------------- noisy top-k
def ref_noisy(x, wg, wn, k, noise=None, noise_eps=1e-2, cf=None, w_imp=0.01, w_load=0.01):
    """Shazeer et al. written directly from the definitions.  noise: (S, E) standard normals or
    None (eval).  Load in training uses kth_excluding: the k-th largest of H(x) with entry i removed."""
    S, E = x.shape[0], wg.shape[0]
    clean = ref_logits(x, wg)
    if noise is not None:
        raw = ref_logits(x, wn)
        sigma = [[math.log1p(math.exp(v)) + noise_eps for v in row] for row in raw]
        H = [[clean[t][i] + noise[t][i] * sigma[t][i] for i in range(E)] for t in range(S)]
    else:
        H = clean
    idx, gates = [], []
    for t in range(S):
        chosen = topk_desc(H[t], k)
        idx.append(chosen)
        gates.append(softmax([H[t][i] for i in chosen]))
    keep = ref_capacity(idx, [[True] * k for _ in range(S)], E, ref_cap(cf, S, E, k))
    gates = [[g * kp for g, kp in zip(gr, kr)] for gr, kr in zip(gates, keep)]
    importance = [0.0] * E
    hard_load = [0.0] * E
    for t in range(S):
        for j in range(k):
            importance[idx[t][j]] += gates[t][j]
            hard_load[idx[t][j]] += 1.0 if gates[t][j] > 0 else 0.0
    if noise is not None and k < E:
        load = [0.0] * E
        for t in range(S):
            for i in range(E):
                others = sorted((H[t][j] for j in range(E) if j != i), reverse=True)
                kth = others[k - 1]
                load[i] += phi((clean[t][i] - kth) / sigma[t][i])
    else:
        load = hard_load
    return idx, gates, keep, w_imp * ref_cv2(importance), w_load * ref_cv2(load), load


def randomize_noisy(router, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.w_gate.copy_(torch.randn(router.w_gate.shape, generator=g) * scale)
        router.w_noise.copy_(torch.randn(router.w_noise.shape, generator=g) * 0.5 * scale)


@pytest.mark.parametrize("S,E,M,k", [(5, 3, 4, 1), (20, 4, 6, 2), (33, 6, 8, 3), (12, 5, 4, 4)])
def test_noisy_topk_eval_matches_reference(S, E, M, k):
    router = NoisyTopKRouter(M, E, k=k, importance_loss_weight=0.1, load_loss_weight=0.2)
    randomize_noisy(router, S + k)
    router.eval()
    x = make_x(S, M, k)
    r = router(x)
    idx, gates, keep, imp, load, _ = ref_noisy(x, router.w_gate, router.w_noise, k, w_imp=0.1, w_load=0.2)
    check(r, idx, gates, keep)
    torch.testing.assert_close(r.losses["importance"].double(), torch.tensor(imp, dtype=torch.float64), atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(r.losses["load"].double(), torch.tensor(load, dtype=torch.float64), atol=1e-7, rtol=1e-5)
    # gates = softmax over the top-k clean logits: a distribution over the k chosen experts
    torch.testing.assert_close(r.gate.double().sum(1), torch.ones(S, dtype=torch.float64))


@pytest.mark.parametrize("S,E,M,k", [(8, 3, 4, 1), (25, 4, 6, 2), (40, 6, 8, 3), (16, 5, 4, 4)])
def test_noisy_topk_train_noise_reproduced_and_load_loss(S, E, M, k):
    router = NoisyTopKRouter(M, E, k=k, importance_loss_weight=0.1, load_loss_weight=0.3)
    randomize_noisy(router, 100 + S)
    router.train()
    x = make_x(S, M, 3 * S)
    torch.manual_seed(2024)
    r = router(x)
    torch.manual_seed(2024)
    noise = torch.randn(S, E).double().tolist()
    idx, gates, keep, imp, load, load_vec = ref_noisy(x, router.w_gate, router.w_noise, k, noise=noise,
                                                      w_imp=0.1, w_load=0.3)
    check(r, idx, gates, keep)
    torch.testing.assert_close(r.losses["importance"].double(), torch.tensor(imp, dtype=torch.float64), atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(r.losses["load"].double(), torch.tensor(load, dtype=torch.float64), atol=1e-7, rtol=1e-4)
    # the smooth load is a fractional expected count: not the hard count of chosen experts
    hard = [sum(1 for t in range(S) if i in idx[t]) for i in range(E)]
    assert any(abs(a - b) > 1e-3 for a, b in zip(load_vec, hard))
    # sum of expected loads is close to but not exactly S * k
    assert abs(sum(load_vec) - S * k) < S * k


def test_noisy_topk_initial_zero_weights_noise_breaks_ties():
    S, E, M, k = 30, 4, 6, 2
    router = NoisyTopKRouter(M, E, k=k)
    assert torch.all(router.w_gate == 0) and torch.all(router.w_noise == 0)
    torch.manual_seed(0)
    r = router(torch.randn(S, M))
    assert torch.isfinite(r.losses["load"]) and torch.isfinite(r.losses["importance"])
    # every expert gets chosen by someone thanks to the noise
    assert set(r.expert_index.flatten().tolist()) == set(range(E))
    assert torch.all(r.expert_index[:, 0] != r.expert_index[:, 1])


def test_noisy_topk_with_capacity_and_eval_k():
    S, E, M, k = 24, 4, 6, 2
    router = NoisyTopKRouter(M, E, k=k, capacity_factor=0.5, eval_capacity_factor=0.5, eval_k=3)
    randomize_noisy(router, 9)
    with torch.no_grad():
        router.w_gate[0] += 2.0  # constant-ish feature 0 pushes expert 0
    router.eval()
    x = make_x(S, M, 2)
    r = router(x)
    assert r.expert_index.shape == (S, 3)  # eval_k overrides k in eval mode
    idx, gates, keep, imp, load, _ = ref_noisy(x, router.w_gate, router.w_noise, 3, cf=0.5)
    check(r, idx, gates, keep)
    assert int(r.dropped_by_capacity) == sum(not v for row in keep for v in row) > 0
    torch.testing.assert_close(r.losses["load"].double(), torch.tensor(load, dtype=torch.float64), atol=1e-7, rtol=1e-5)
    router.train()
    torch.manual_seed(3)
    assert router(x).expert_index.shape == (S, k)


# --------------------------------------------------------------------------- random (SMoE-Dropout)
@pytest.mark.parametrize("S,E,M,k", [(5, 3, 4, 1), (20, 4, 6, 2), (37, 6, 8, 3), (10, 5, 4, 5)])
def test_random_router_matches_reference(S, E, M, k):
    router = RandomRouter(M, E, KSchedule(k, k, 0, "fixed"))
    x = make_x(S, M, S)
    for training in (True, False):
        router.train(training)
        r = router(x)
        logits = ref_logits(x, router.weight)
        idx = [topk_desc(row, k) for row in logits]
        gates = [softmax([row[i] for i in ch]) for row, ch in zip(logits, idx)]
        check(r, idx, gates, [[True] * k for _ in range(S)])
        assert r.losses == {}


def test_random_router_at_k_equals_e_uses_softmax_of_all_logits():
    S, E, M = 12, 5, 6
    router = RandomRouter(M, E, KSchedule(1, 2, 100, "linear"), eval_k=E)
    router.eval()
    x = make_x(S, M, 1)
    r = router(x)
    logits = ref_logits(x, router.weight)
    dense = torch.zeros(S, E, dtype=torch.float64).scatter(1, r.expert_index, r.gate.double())
    torch.testing.assert_close(dense, torch.tensor([softmax(row) for row in logits], dtype=torch.float64),
                               atol=ATOL, rtol=0)
    assert sorted(r.expert_index[0].tolist()) == list(range(E))


def test_random_router_capacity():
    S, E, M, k = 30, 4, 6, 2
    router = RandomRouter(M, E, KSchedule(k, k, 0, "fixed"), capacity_factor=0.5, eval_capacity_factor=1.0)
    x = make_x(S, M, 6)
    for training, cf in ((True, 0.5), (False, 1.0)):
        router.train(training)
        r = router(x)
        logits = ref_logits(x, router.weight)
        idx = [topk_desc(row, k) for row in logits]
        keep = ref_capacity(idx, [[True] * k for _ in range(S)], E, ref_cap(cf, S, E, k))
        gates = [[g * kp for g, kp in zip(softmax([row[i] for i in ch]), kr)] for row, ch, kr in zip(logits, idx, keep)]
        check(r, idx, gates, keep)
        if training:
            assert int(r.dropped_by_capacity) > 0


def test_random_router_weight_is_frozen_buffer():
    router = RandomRouter(6, 4, KSchedule(1, 4, 10))
    assert "weight" in router.state_dict()
    assert "weight" in dict(router.named_buffers())
    assert len(list(router.parameters())) == 0
    assert not router.weight.requires_grad
    x = torch.randn(7, 6, requires_grad=True)
    r = router(x)
    # frozen weight, but the gates are still a function of x: the gradient reaches the input
    r.gate.sum().backward()
    assert router.weight.grad is None
    assert x.grad is not None
    router.eval()  # k = k_max = 4: gates depend on x non-trivially
    y = torch.randn(7, 6, dtype=torch.float64)
    g = torch.randn(7, router(y).gate.shape[1], dtype=torch.float64)
    xr = y.clone().requires_grad_(True)
    (router(xr).gate.double() * g).sum().backward()
    xd = y.clone().requires_grad_(True)
    logits = xd @ router.weight.double().t()
    idx = router(y).expert_index
    (torch.softmax(logits.gather(1, idx), 1) * g).sum().backward()
    torch.testing.assert_close(xr.grad, xd.grad, atol=1e-5, rtol=1e-4)


def test_router_registry():
    assert set(ROUTERS) == {"top1", "top2", "noisy_topk", "random"}
    assert set(SECOND_EXPERT_POLICIES) == {"all", "random", "sampling"}


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make,message", [  # in the arguments' names: the flags' rules are MoEConfig's
    (lambda: NoisyTopKRouter(4, 3, k=4), "NoisyTopKRouter: k must be between 1 and num_experts=3 (got 4)"),
    (lambda: NoisyTopKRouter(4, 3, k=0), "NoisyTopKRouter: k must be between 1 and num_experts=3 (got 0)"),
    (lambda: NoisyTopKRouter(4, 3, k=2, eval_k=5), "NoisyTopKRouter: eval_k must be between 1 and num_experts=3 "
                                                   "(got 5)"),
    (lambda: RandomRouter(4, 3, KSchedule(1, 4, 10)), "RandomRouter: k must be between 1 and num_experts=3 (got 4)"),
    (lambda: RandomRouter(4, 3, KSchedule(1, 3, 10), eval_k=4), "RandomRouter: eval_k must be between 1 and"),
    (lambda: RandomRouter(4, 3, KSchedule(1, 3, 10), eval_k=0), "RandomRouter: eval_k must be between 1 and"),
    (lambda: Top1Router(4, 3, capacity_factor=0.0), "Top1Router: capacity_factor must be > 0, or None"),
    (lambda: Top1Router(4, 3, capacity_factor=-1.0), "Top1Router: capacity_factor must be > 0, or None"),
    (lambda: Top2Router(4, 3, eval_capacity_factor=0.0), "Top2Router: eval_capacity_factor must be > 0"),
    (lambda: Top2Router(4, 3, second_expert_policy="gumbel"), "Top2Router: second_expert_policy must be one of"),
    (lambda: Top2Router(4, 1), "Top2Router needs num_experts >= 2 (got 1)"),
    (lambda: Top1Router(4, 0), "Top1Router: num_experts must be >= 1 (got 0)"),
    (lambda: Top1Router(4, 3).set_eval_k(1), "Top1Router routes a fixed k: eval_k must be None (got 1)"),
])
def test_router_bad_input(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert str(err.value).startswith(message)
    assert not isinstance(err.value, MoEUsageError)  # not a flag's error: a library call's
