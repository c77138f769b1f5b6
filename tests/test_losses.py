"""Auxiliary losses against independent per-token / per-expert loops, plus float64 gradchecks."""
import math

import pytest
import torch

from moe_fairseq.moe.losses import cv_squared, gshard_balance_loss, router_z_loss, switch_balance_loss
from moe_fairseq.moe.routers.noisy_topk import NoisyTopKRouter

pytestmark = pytest.mark.usefixtures("one_thread")


def phi(z):
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def ref_cv2(values, eps=1e-10):
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / n  # population variance
    return var / (mean ** 2 + eps)


def rand_probs(S, E, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(S, E, generator=g, dtype=torch.float64) * 2
    return torch.softmax(logits, -1), logits


@pytest.mark.parametrize("values", [[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0], [0.0, 0.0, 9.0], [0.3, 1e-3, 7.0, 2.5, 0.0]])
def test_cv_squared(values):
    got = cv_squared(torch.tensor(values, dtype=torch.float64))
    assert got.dtype == torch.float64
    assert abs(float(got) - ref_cv2(values)) < 1e-12 * max(1.0, ref_cv2(values))
    # explicit value: [1,2,3,4] has mean 2.5, population variance 1.25 -> 0.2
    if values == [1.0, 2.0, 3.0, 4.0]:
        assert abs(float(got) - 0.2) < 1e-9


def test_cv_squared_edge_cases_and_dtypes():
    assert float(cv_squared(torch.tensor([3.0]))) == 0.0
    assert float(cv_squared(torch.zeros(4))) == 0.0  # no nan for all-zero loads
    assert cv_squared(torch.tensor([1, 2, 3])).dtype == torch.float32  # integer counts are upcast
    assert cv_squared(torch.tensor([1.0, 2.0], dtype=torch.float16)).dtype == torch.float32


@pytest.mark.parametrize("S,E", [(5, 3), (17, 4), (40, 6)])
def test_switch_balance_loss(S, E):
    probs, _ = rand_probs(S, E, S * E)
    top1 = probs.argmax(1)
    ref = 0.0
    for i in range(E):
        f_i = sum(1 for t in range(S) if int(top1[t]) == i) / S
        p_i = sum(float(probs[t, i]) for t in range(S)) / S
        ref += f_i * p_i
    ref *= E
    assert abs(float(switch_balance_loss(probs, top1)) - ref) < 1e-12


def test_switch_balance_loss_uniform_is_one():
    # perfectly balanced: f_i = P_i = 1/E gives E * E * (1/E)^2 = 1
    E = 4
    probs = torch.full((8, E), 1.0 / E, dtype=torch.float64)
    top1 = torch.arange(8) % E
    assert abs(float(switch_balance_loss(probs, top1)) - 1.0) < 1e-12


@pytest.mark.parametrize("S,E", [(5, 3), (17, 4), (40, 6)])
def test_gshard_balance_loss(S, E):
    probs, _ = rand_probs(S, E, S + E)
    top1 = probs.argmax(1)
    acc = 0.0
    for i in range(E):
        me = sum(float(probs[t, i]) for t in range(S)) / S
        ce = sum(1 for t in range(S) if int(top1[t]) == i) / S
        acc += me * ce
    ref = E * E * acc / E
    assert abs(float(gshard_balance_loss(probs, top1)) - ref) < 1e-12


@pytest.mark.parametrize("S,E", [(5, 3), (17, 4), (40, 6)])
def test_router_z_loss(S, E):
    _, logits = rand_probs(S, E, 3 * S)
    ref = sum(math.log(sum(math.exp(float(v)) for v in logits[t])) ** 2 for t in range(S)) / S
    got = router_z_loss(logits)
    assert got.dtype == torch.float64
    assert abs(float(got) - ref) < 1e-12 * max(1, ref)


def test_losses_of_no_tokens_are_zero_not_nan():
    """A batch that is all padding routes zero tokens: the losses must be 0, not 0/0."""
    E = 4
    probs = torch.zeros(0, E)
    top1 = torch.zeros(0, dtype=torch.long)
    assert float(switch_balance_loss(probs, top1)) == 0.0
    assert float(gshard_balance_loss(probs, top1)) == 0.0
    assert float(router_z_loss(torch.zeros(0, E))) == 0.0


def test_loss_gradchecks_float64():
    S, E = 6, 4
    probs, logits = rand_probs(S, E, 1)
    top1 = probs.argmax(1)
    logits = logits.clone().requires_grad_(True)
    x = (torch.rand(E, dtype=torch.float64) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(cv_squared, (x,))
    assert torch.autograd.gradcheck(router_z_loss, (logits,))
    # gradients w.r.t. the router logits through the softmax (f / ce are constants)
    assert torch.autograd.gradcheck(lambda lg: switch_balance_loss(torch.softmax(lg, -1), top1), (logits,))
    assert torch.autograd.gradcheck(lambda lg: gshard_balance_loss(torch.softmax(lg, -1), top1), (logits,))
    # analytic check: d/dP_i of E * sum f_i P_i is E * f_i / S per token
    p = probs.clone().requires_grad_(True)
    switch_balance_loss(p, top1).backward()
    f = torch.bincount(top1, minlength=E).double() / S
    torch.testing.assert_close(p.grad, (E * f / S).expand(S, E))


# ------------------------------------------------------------------ noisy top-k smooth load
def ref_smooth_load(clean, noisy, sigma, k):
    """Load_i = sum_x Phi((clean_i - kth_excluding(H(x), k, i)) / sigma_i), written from the
    definition: remove entry i from H(x), sort the rest descending, take the k-th."""
    S, E = clean.shape
    load = [0.0] * E
    for t in range(S):
        H = noisy[t].tolist()
        for i in range(E):
            others = sorted((H[j] for j in range(E) if j != i), reverse=True)
            kth = others[k - 1]
            load[i] += phi((float(clean[t, i]) - kth) / float(sigma[t, i]))
    return load


def noisy_inputs(S, E, seed):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(S, E, generator=g, dtype=torch.float64)
    sigma = torch.nn.functional.softplus(torch.randn(S, E, generator=g, dtype=torch.float64)) + 1e-2
    noise = torch.randn(S, E, generator=g, dtype=torch.float64)
    return clean, sigma, noise


@pytest.mark.parametrize("S,E,k", [(7, 3, 1), (7, 3, 2), (20, 4, 2), (30, 6, 1), (30, 6, 3), (25, 6, 5)])
def test_smooth_load_matches_kth_excluding_definition(S, E, k):
    clean, sigma, noise = noisy_inputs(S, E, S * 10 + k)
    noisy = clean + noise * sigma
    top_values = noisy.topk(k + 1, dim=1).values
    got = NoisyTopKRouter._smooth_load(clean, noisy, sigma, top_values, k)
    assert got.dtype == torch.float64
    ref = ref_smooth_load(clean, noisy, sigma, k)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), atol=1e-12, rtol=1e-10)


def test_smooth_load_is_probability_of_selection():
    """Monte Carlo: P(x, i) is the probability, over a fresh draw of n_i only, that expert i is
    in the top k given the other noisy logits.  Averaged over many tokens the load estimate
    and the expected hard count agree."""
    S, E, k = 1, 4, 2
    clean, sigma, noise = noisy_inputs(S, E, 5)
    noisy = clean + noise * sigma
    top_values = noisy.topk(k + 1, dim=1).values
    load = NoisyTopKRouter._smooth_load(clean, noisy, sigma, top_values, k)
    g = torch.Generator().manual_seed(0)
    n = 200000
    for i in range(E):
        fresh = clean[0, i] + torch.randn(n, generator=g, dtype=torch.float64) * sigma[0, i]
        others = torch.cat([noisy[0, :i], noisy[0, i + 1:]])
        kth = others.topk(k).values[-1]
        mc = (fresh > kth).double().mean()
        assert abs(float(mc) - float(load[i])) < 5 * math.sqrt(0.25 / n)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_smooth_load_gradcheck_float64(k):
    S, E = 5, 4
    clean, sigma, noise = noisy_inputs(S, E, 42 + k)
    clean.requires_grad_(True)
    sigma.requires_grad_(True)

    def fn(c, s):
        h = c + noise * s
        tv = h.topk(k + 1, dim=1).values
        return NoisyTopKRouter._smooth_load(c, h, s, tv, k)

    assert torch.autograd.gradcheck(fn, (clean, sigma))

    # also the full load loss cv^2(load) in float64
    assert torch.autograd.gradcheck(lambda c, s: cv_squared(fn(c, s)), (clean, sigma))
