"""The MoE layer in every precision fairseq trains in, against the fp32 layer as the reference.

- autocast (fairseq's --amp): bf16 on CPU, the code path CUDA fp16 autocast takes too;
- fp16 / bf16 parameters (fairseq's --fp16 / --bf16 / --memory-efficient-fp16 call model.half()
  or model.bfloat16(), and feed half-precision activations).

Each for every router, a Gate-Drop and a Gate-Expert-Drop step, with padding.  Routing is in
fp32 in every mode (router logits, softmax, gates, aux losses), so with the same seed and the
same inputs the routing is identical and only the experts' arithmetic differs: the outputs and
every gradient must then agree with the fp32 layer to within the precision of the format.

MOE_TEST_DEVICE=cuda (scripts/gpu_check.sh) runs them on a GPU, autocast in fp16 and bf16 there.

Tolerances are relative, on the Frobenius norm of the difference (tiny dims, M=8, F=16):
bf16 (8-bit mantissa, unit roundoff 2^-9 = 2e-3): 1.5e-2; fp16 (11 bits, 2^-12 = 2.4e-4): 2e-3.
The largest errors measured over all cases were 4.6e-3 (bf16) and 6e-4 (fp16), a third of these.
"""
import copy
import os

import pytest
import torch
import torch.nn as nn

from moe_fairseq.moe import FFNExperts, MoELayer, Top2Router
from moe_fairseq.moe.gating_dropout import gating_dropout_fires
from test_layer import make_router

pytestmark = pytest.mark.usefixtures("one_thread")

M, E, F, T, B = 8, 4, 16, 5, 3
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}
DEVICE = os.environ.get("MOE_TEST_DEVICE", "cpu")
# CPU autocast is bf16 (fp16 autocast on CPU is not what fairseq's --amp does); CUDA's is fp16.
AUTOCAST = {"cpu": [torch.bfloat16], "cuda": [torch.float16, torch.bfloat16]}[DEVICE]
ROUTED = ["top1", "top2_sampling", "top2_all", "top2_random", "noisy_topk", "random"]
GATING_DROPOUT = ["gate_drop", "gate_expert_drop", "local_topk"]


def build(kind, seed=0):
    if kind in GATING_DROPOUT:
        torch.manual_seed(seed)
        layer = MoELayer(Top2Router(M, E, capacity_factor=1.0, z_loss_weight=1e-3), FFNExperts(E, M, F),
                         gating_dropout=0.5, gating_dropout_mode=kind)
        layer.set_num_updates(next(u for u in range(100) if gating_dropout_fires(0.5, layer.seed, u, 0)))
        assert layer.gating_dropped()
        return layer.to(DEVICE)
    router = make_router(kind, M, E, seed)
    layer = MoELayer(router, FFNExperts(E, M, F))
    if kind == "random":
        layer.set_num_updates(5)  # k = 2 or 3 of the schedule 1 -> 4
    return layer.to(DEVICE)


def inputs(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, M, generator=g)
    mask = torch.zeros(T, B, dtype=torch.bool)
    mask[3:, 0] = mask[4:, 2] = True  # padding at the end of two sequences
    target = torch.randn(T, B, M, generator=g)
    return x.to(DEVICE, dtype), mask.to(DEVICE), target.to(DEVICE)


def step(layer, x, mask, target, seed=7, autocast_dtype=None):
    """Forward (same RNG draws every time: same seed), loss with the aux losses, backward."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    with torch.autocast(DEVICE, dtype=autocast_dtype or AUTOCAST[0], enabled=autocast_dtype is not None):
        out = layer(x, mask)
        aux = sum(layer.aux.losses.values(), torch.zeros((), device=DEVICE))
    loss = (out.float() * target).sum() + 10 * aux
    loss.backward()
    grads = {"x": x.grad} if x.grad is not None else {}  # Gate-Expert-Drop: output independent of x
    grads.update((n, p.grad) for n, p in layer.named_parameters() if p.grad is not None)
    return out, aux, grads, layer.aux.stats


def rel_err(got, want):
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm().clamp_min(1e-12)) if want.norm() > 0 else float(got.norm())


def assert_close(got, want, tol, what):
    err = rel_err(got, want)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"
    return err


def compare(got, want, tol):
    out, aux, grads, stats = got
    ref_out, ref_aux, ref_grads, ref_stats = want
    errs = [assert_close(out, ref_out, tol, "output")]
    assert_close(aux, ref_aux, 1e-5, "aux loss")  # fp32 in both: same routing, same value
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        errs.append(assert_close(grads[name], ref_grads[name], tol, f"grad of {name}"))
    # Same routing: same tokens per expert, same capacity drops.
    assert torch.equal(stats.tokens_per_expert, ref_stats.tokens_per_expert)
    assert torch.equal(stats.dropped_by_capacity, ref_stats.dropped_by_capacity)
    return max(errs)


@pytest.mark.parametrize("dtype", AUTOCAST)
@pytest.mark.parametrize("kind", ROUTED + GATING_DROPOUT)
def test_autocast_matches_fp32(kind, dtype):
    layer = build(kind)
    x, mask, target = inputs()
    want = step(layer, x, mask, target)
    got = step(layer, x, mask, target, autocast_dtype=dtype)
    assert got[0].dtype == torch.float32  # the residual stream's dtype, not the experts'
    err = compare(got, want, TOL[dtype])
    assert (got[0][mask] == 0).all()
    if kind != "gate_expert_drop":  # otherwise the experts did not run: nothing in bf16
        assert err > 1e-5, "no rounding at all: the experts did not run in half precision"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ROUTED + GATING_DROPOUT)
def test_half_parameters_match_fp32(kind, dtype):
    """model.half() / model.bfloat16() (fairseq --fp16 / --bf16) against the same rounded
    weights and inputs in fp32."""
    half = build(kind).to(dtype)
    x, mask, target = inputs(dtype)
    ref = copy.deepcopy(half).float()
    want = step(ref, x.float(), mask, target)
    got = step(half, x, mask, target)
    assert got[0].dtype == dtype
    if kind == "random":
        assert half.router.weight.dtype == dtype  # the frozen router is a buffer, converted too
    err = compare(got, want, TOL[dtype])
    if kind != "gate_expert_drop":
        assert err > 1e-6


def test_issue_reproduction_linear_then_moe_under_autocast():
    """Issue #10: nn.Linear -> top-2 MoELayer under CPU bf16 autocast, then backward.  It used to
    fail with 'mat1 and mat2 must have the same dtype'."""
    torch.manual_seed(0)
    lin = nn.Linear(M, M).to(DEVICE)
    layer = MoELayer(Top2Router(M, E, capacity_factor=None, eval_capacity_factor=None), FFNExperts(E, M, F)).to(DEVICE)
    x = torch.randn(6, M).to(DEVICE)
    torch.manual_seed(1)  # the same Gumbel draws for the reference below
    with torch.autocast(DEVICE, dtype=AUTOCAST[0]):
        h = lin(x)
        assert h.dtype == AUTOCAST[0]
        y = layer(h)
        loss = y.float().pow(2).sum() + sum(layer.aux.losses.values())
    loss.backward()
    for p in list(lin.parameters()) + list(layer.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    assert y.dtype == AUTOCAST[0]  # the input's dtype: the residual stream here is half precision
    # Against fp32 (the linear's output rounded to bf16 as autocast did, so routing is the same).
    torch.manual_seed(1)
    ref_y = layer(h.detach().float())
    assert_close(y, ref_y, TOL[AUTOCAST[0]], "output")


def test_backward_inside_autocast_region():
    """backward() called inside the autocast context (legal, if unusual) recomputes nothing in
    another dtype: the grouped GEMMs' backward runs with autocast off."""
    layer = build("top2_all")
    x, mask, target = inputs()
    want = step(layer, x, mask, target)
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    with torch.autocast(DEVICE, dtype=AUTOCAST[0]):
        out = layer(x, mask)
        ((out.float() * target).sum() + 10 * sum(layer.aux.losses.values())).backward()
    for name, p in layer.named_parameters():
        assert_close(p.grad, want[2][name], TOL[AUTOCAST[0]], f"grad of {name}")


# ------------------------------------------------------------------ fairseq's fp16 loss scaler
def fp16_optimizer(params):
    """fairseq's --memory-efficient-fp16 optimizer (dynamic loss scaler) around plain SGD."""
    from omegaconf import OmegaConf
    from fairseq.optim.fp16_optimizer import MemoryEfficientFP16Optimizer
    from fairseq.optim.sgd import SGD

    from moe_fairseq import fairseq_patches

    fairseq_patches.install()  # patch 9: overflow in expert gradients counts as an overflow

    cfg = OmegaConf.create({
        "common": {"fp16_init_scale": 128, "fp16_scale_window": 100, "fp16_scale_tolerance": 0.0,
                   "threshold_loss_scale": None, "min_loss_scale": 1e-4, "model_parallel_size": 1, "bf16": False},
        "optimization": {"update_freq": [1], "lr": [0.1]},
        "distributed_training": {"distributed_world_size": 1},
        "optimizer": {"lr": [0.1], "momentum": 0.0, "weight_decay": 0.0}})
    # allow_unsupported: SGD has no memory-efficient fp16 update of its own; the loss scaling and
    # the overflow check, which are what is tested, do not depend on the inner optimizer.
    return MemoryEfficientFP16Optimizer(cfg, params, SGD(cfg.optimizer, params), allow_unsupported=True)


@pytest.mark.parametrize("kind", ["top2_sampling", "noisy_topk", "random"])
def test_fp16_loss_scaler_scales_aux_losses_and_skips_overflow(kind):
    if DEVICE != "cpu":
        pytest.skip("CPU only: fairseq's optimizer is device-agnostic, this checks our part")
    layer = build(kind).half()
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = fp16_optimizer(params)
    x, mask, _ = inputs(torch.float16)
    # Aux losses only (weight 1e3 so they dominate): the router's gradient then comes from them
    # alone, and must arrive multiplied by the loss scale like the main loss's.
    torch.manual_seed(7)
    layer(x, mask)
    aux = sum(layer.aux.losses.values(), torch.zeros(()))
    if kind != "random":  # the random router has no aux loss and no trainable router
        ref = torch.autograd.grad(1e3 * aux, [p for p in layer.router.parameters()], retain_graph=True)
        opt.backward(1e3 * aux)  # fairseq: loss * scale, then backward
        for p, g in zip(layer.router.parameters(), ref):
            assert_close(p.grad.float(), 128 * g.float(), 1e-3, "scaled router grad")
        opt.zero_grad()
    # An overflow step: inputs near fp16's max overflow the experts (inf / nan gradients).
    before = {n: t.detach().clone() for n, t in layer.state_dict().items()}
    torch.manual_seed(7)
    out = layer(torch.full_like(x, 6e4), mask)
    stats = layer.aux.stats
    opt.backward(out.float().sum() + sum(layer.aux.losses.values(), torch.zeros(())))
    assert any(not torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    with pytest.raises(OverflowError):
        opt.clip_grad_norm(0.0)  # what fairseq's trainer calls; it then zeroes grads and skips the step
    opt.zero_grad()
    assert opt.scaler.loss_scale == 64  # halved for the next step
    for name, t in layer.state_dict().items():  # router weights, the frozen random router, experts
        assert torch.equal(t, before[name]) and torch.isfinite(t).all(), name
    # Routing is fp32, so even this step's statistics are finite.
    for field in ("num_tokens", "tokens_per_expert", "dropped_by_capacity", "gate_entropy_sum", "a2a_bytes"):
        assert torch.isfinite(getattr(stats, field).float()).all(), field
