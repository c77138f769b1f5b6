"""int8 inference modules (moe/int8.py) on small tensors: the kernel against an exact emulation
(activations quantized per call as fbgemm does, then dequantize-and-matmul in float64), the error
against the fp32 layer within the derived bound, embeddings, MoE experts on both decode paths,
and the swap of a fairseq model's modules (models/int8_inference.py)."""
import pytest
import torch
import torch.nn.functional as F

from moe_fairseq.moe import FFNExperts, MoELayer, Top2Router
from moe_fairseq.moe.errors import MoEUsageError
from moe_fairseq.moe.int8 import (ACT_QMAX, Int8Embedding, Int8FFNExperts, Int8Linear, dequantize, error_bound,
                                  quantize_per_channel)

pytestmark = pytest.mark.usefixtures("one_thread")


def emulated_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: one affine 7-bit grid per call over [min(x, 0), max(x, 0)]
    (fbgemm's ChooseQuantizationParams with reduce_range, zero point rounded into the grid)."""
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / ACT_QMAX
    if scale == 0:
        return torch.zeros_like(x, dtype=torch.float64)
    scale = float(torch.tensor(scale, dtype=torch.float32))  # fbgemm keeps the scale as a float
    from_min, from_max = -lo / scale, ACT_QMAX - hi / scale
    zp = from_min if abs(lo / scale) < ACT_QMAX + abs(hi / scale) else from_max
    zp = int(min(max(round(zp), 0), ACT_QMAX))
    q = torch.clamp(torch.round(x.double() / scale) + zp, 0, 255)
    return (q - zp) * scale


def reference(x, q, scale, bias):
    """Dequantize the weight, quantize the activations as the kernel does, multiply in float64."""
    x2 = x.reshape(-1, x.shape[-1])
    y = emulated_activations(x2) @ dequantize(q, scale).double().t()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], q.shape[0])


def test_per_channel_quantization_levels():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    w[2] = 0  # an all-zero row
    w[3] *= 1e-6  # a tiny one keeps its own scale
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (6,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert torch.all((w - dequantize(q, scale)).abs() <= scale.unsqueeze(1) / 2 * (1 + 1e-6))
    for n in (0, 1, 3, 4, 5):  # each row's largest weight is exactly a level
        assert int(q[n].abs().max()) == 127
    assert torch.equal(q[2], torch.zeros(10, dtype=torch.int8)) and scale[2] == 1
    # brute force: the nearest of the 255 levels, row by row
    for n in range(6):
        levels = torch.arange(-127, 128, dtype=torch.float64) * scale[n].double()
        nearest = (w[n].double().unsqueeze(1) - levels).abs().argmin(1) - 127
        assert torch.equal(nearest.to(torch.int8), q[n])


@pytest.mark.parametrize("shape,out", [((1, 16), 8), ((7, 16), 24), ((33, 32), 16), ((2, 5, 16), 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_matches_dequantize_then_matmul(shape, out, bias):
    torch.manual_seed(1)
    linear = torch.nn.Linear(shape[-1], out, bias=bias)
    x = torch.randn(*shape) * 3
    int8 = Int8Linear.from_float(linear)
    y = int8(x)
    assert y.shape == (*shape[:-1], out) and y.dtype == torch.float32
    ref = reference(x, int8.weight_int8, int8.weight_scale, linear.bias)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gaussian", "positive", "negative", "outlier", "zeros"])
def test_int8_linear_error_within_the_bound(kind):
    """|y - y_fp32| <= s_x/2 sum|w_hat| + scale/2 sum|x| per output (moe/int8.py), and the
    kernel's error is of the bound's order (not vacuously below it)."""
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 32)
    x = {"gaussian": torch.randn(9, 64), "positive": torch.rand(9, 64) * 5, "negative": -torch.rand(9, 64),
         "outlier": torch.randn(9, 64).index_put_((torch.tensor([3]), torch.tensor([7])), torch.tensor(40.0)),
         "zeros": torch.zeros(9, 64)}[kind]
    int8 = Int8Linear.from_float(linear)
    with torch.no_grad():
        err = (int8(x) - linear(x)).abs()
    bound = error_bound(x, int8.weight_int8, int8.weight_scale)
    assert torch.all(err <= bound * (1 + 1e-4) + 1e-6), (err - bound).max()
    if kind == "zeros":
        assert torch.equal(int8(x), linear.bias.expand(9, 32))
    else:
        assert err.max() > 0.02 * bound.max()


@pytest.mark.parametrize("term", ["activations", "weights"])
def test_int8_linear_error_bound_is_attained(term):
    """Inputs whose rounding errors all point the same way bring the error above 90% of the bound:
    either term of the bound is needed at full size (halving either would be exceeded here).
    activations: weights exactly on their grid (+-1), every activation 0.49 of a step above a level
    but one at the top of the range.  weights: activations exactly on their grid (all equal), every
    weight of row 0 but one 0.49 of a step above level 0."""
    K = 64
    if term == "activations":
        w = torch.ones(2, K)
        w[1] = -1
        s_x = 1.0 / ACT_QMAX
        x = torch.full((1, K), 0.49 * s_x)
        x[0, 0] = ACT_QMAX * s_x
    else:
        w = torch.zeros(2, K)
        w[:, 0] = 1.0
        w[0, 1:] = 0.49 / 127
        x = torch.ones(1, K)
    linear = torch.nn.Linear(K, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    int8 = Int8Linear.from_float(linear)
    with torch.no_grad():
        err = (int8(x) - linear(x)).abs()[0]
    bound = error_bound(x, int8.weight_int8, int8.weight_scale)[0]
    assert torch.all(err <= bound * (1 + 1e-4))
    assert err[0] > 0.9 * bound[0], (err, bound)


def test_int8_linear_reloads_and_repacks():
    torch.manual_seed(3)
    a, b = Int8Linear.from_float(torch.nn.Linear(8, 4)), Int8Linear.from_float(torch.nn.Linear(8, 4))
    x = torch.randn(3, 8)
    a(x)  # packed now
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), b(x))
    assert set(a.state_dict()) == {"weight_int8", "weight_scale", "bias"}


def test_int8_embedding_and_tied_output_projection():
    torch.manual_seed(4)
    emb = torch.nn.Embedding(11, 8, padding_idx=1)
    int8 = Int8Embedding.from_float(emb)
    tokens = torch.tensor([[0, 5, 10], [1, 1, 3]])
    rows = int8(tokens)
    q, scale = quantize_per_channel(emb.weight)
    assert torch.equal(rows, q[tokens].float() * scale[tokens].unsqueeze(-1))  # brute force, bit for bit
    assert torch.all((rows - emb(tokens)).abs() <= scale[tokens].unsqueeze(-1) / 2 * (1 + 1e-6))
    out = int8.tied_linear()
    assert out.weight_int8.data_ptr() == int8.weight_int8.data_ptr()  # one int8 copy
    x = torch.randn(4, 8)
    torch.testing.assert_close(out(x).double(), reference(x, q, scale, None), rtol=1e-5, atol=1e-5)


def brute_force_experts(int8, x, counts):
    """Per expert, per its rows: the emulated kernel twice with the activation between."""
    outs, start = [], 0
    for e, c in enumerate(counts):
        rows = x[start:start + c]
        start += c
        if c == 0:
            continue
        h = reference(rows, int8.w1_int8[e], int8.w1_scale[e], int8.b1[e]).float().relu()
        outs.append(reference(h, int8.w2_int8[e], int8.w2_scale[e], int8.b2[e]))
    return torch.cat(outs)


@pytest.mark.parametrize("counts", [[3, 0, 2, 4], [1, 0, 0, 0], [0, 5, 5, 1]])
def test_int8_experts_against_brute_force(counts):
    torch.manual_seed(5)
    fp32 = FFNExperts(4, 16, 24)
    int8 = Int8FFNExperts.from_float(fp32)
    assert int8.w1_int8.shape == (4, 24, 16) and int8.w2_int8.shape == (4, 16, 24)
    x = torch.randn(sum(counts), 16)
    y = int8(x, counts)
    torch.testing.assert_close(y.double(), brute_force_experts(int8, x, counts), rtol=1e-5, atol=1e-5)
    assert torch.equal(int8(x, torch.tensor(counts)), y)  # counts as a tensor
    with torch.no_grad():
        assert (y - fp32(x, counts)).abs().max() < 0.05 * fp32(x, counts).abs().max()


def test_int8_experts_bad_input_and_no_training():
    int8 = Int8FFNExperts.from_float(FFNExperts(2, 8, 8))
    with pytest.raises(ValueError, match="sum to 3 but there are 4 rows"):
        int8(torch.randn(4, 8), [1, 2])
    with pytest.raises(IndexError):
        int8(torch.randn(3, 8), [1, 1, 1])
    assert not int8.training
    with pytest.raises(MoEUsageError, match="inference only"):
        int8.train()
    int8.eval()


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_moe_layer_with_int8_experts_decode_and_general_paths_agree(rows):
    """Rows <= 32 take the decoder-step path (moe/decode.py), more the general dispatch; each
    expert sees the same rows in the same order either way, so the outputs agree, and both are the
    gate-weighted sum of the emulated experts."""
    torch.manual_seed(6)
    layer = MoELayer(Top2Router(16, 4, capacity_factor=None, eval_capacity_factor=None), FFNExperts(4, 16, 24)).eval()
    layer.experts = Int8FFNExperts.from_float(layer.experts)
    x = torch.randn(rows, 16)
    with torch.no_grad():
        fast = layer(x)
        layer.decode_fast_path = False
        general = layer(x)
        routing = layer.router(x)
    torch.testing.assert_close(fast, general, rtol=1e-5, atol=1e-6)
    expected = torch.zeros(rows, 16, dtype=torch.float64)
    for e in range(4):  # each expert's rows, in token order, through the emulated kernel
        slots = (routing.expert_index == e).nonzero().tolist()
        if slots:
            y = brute_force_experts(layer.experts, x[[s for s, _ in slots]], [0] * e + [len(slots)])
            for (s, j), row in zip(slots, y):
                expected[s] += float(routing.gate[s, j]) * row
    torch.testing.assert_close(fast.double(), expected, rtol=1e-5, atol=1e-5)
