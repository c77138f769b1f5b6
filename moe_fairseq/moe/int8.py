"""int8 weights for CPU inference: Linear, Embedding and MoE experts (torch only).

Every weight matrix is stored as int8 with one fp32 scale per output channel (symmetric:
w ~ q * scale[n], q in [-127, 127], scale[n] = max_k |w[n, k]| / 127), a quarter of its fp32
bytes.  Biases, layer norms and routers stay fp32.

Kernel: torch's dynamic int8 linear (`torch.ops.quantized.linear_dynamic`, fbgemm, what
`torch.ao.quantization.quantize_dynamic` runs) for every call.  It quantizes each call's
activations to 7 bits (one affine scale per call, computed on the fly: REDUCE_RANGE) and
multiplies int8 by int8 into int32.  Measured against the alternatives on the shapes of the
Multi30k models (scripts/bench_int8_kernels.py; docs/benchmarks.md, "int8 inference"): with the
weights out of cache, as in a decoder step that reads every layer's weights once, it was level
with fp32 addmm at 1-5 rows and 1.3-2.2x faster from 20 rows on, 2.2-4x on the output
projection (8 MB in fp32) up to 160 rows.  `torch.ops.aten._weight_int8pack_mm` (weight-only,
bf16 activations; its fp32 path is not vectorised in torch 2.13) was level with it at 1-5 rows
and 2-6x slower from 20 rows on.  torch marks its quantized tensor types deprecated (a warning
silenced in `prepack`); the packed weight is still what its int8 CPU GEMM takes.

Error: with s_x the activation scale of a call and scale[n] the weight scale of channel n,
|y[n] - y_fp32[n]| <= s_x / 2 * sum_k |q[n, k] * scale[n]| + scale[n] / 2 * sum_k |x[k]|
(`error_bound`; tests/test_int8.py checks it and an exact emulation of the kernel).

The prepacked fbgemm weights are built from the int8 buffers on first use (and again after
load_state_dict), so a state dict holds only plain int8 tensors and fp32 scales.
"""
import warnings
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import MoEUsageError

QMAX = 127  # symmetric int8: -128 is never used, so q and -q are both representable
# The kernel quantizes activations to 7 bits (0..127) unless the host's int8 GEMM accumulates in
# int32 (VNNI): on AVX2 without VNNI the u8 x s8 pair sums saturate int16 at 8 bits.  torch's
# quantize_dynamic makes the same choice (reduce_range=True) on every x86 host.
REDUCE_RANGE = True
ACT_QMAX = 127 if REDUCE_RANGE else 255


def quantize_per_channel(w: torch.Tensor):
    """(q int8, scale fp32) of a (..., N, K) weight, one scale per row n (output channel): the
    nearest of the 255 levels q * scale to each weight, so |w - q * scale| <= scale / 2."""
    w = w.detach().float()
    amax = w.abs().amax(-1)
    # an all-zero row gets scale 1 (q = 0 there whatever the scale) rather than a division by 0
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(w / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.unsqueeze(-1)


def error_bound(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Bound on |linear(x, w) - int8 kernel(x)| per output (the module docstring), for the rows of
    x (M, K) in one call, a weight quantized per channel as (q, scale), and the same bias."""
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    s_x = (hi - lo) / ACT_QMAX
    w_hat = dequantize(q, scale)
    return s_x / 2 * w_hat.abs().sum(1) + x.abs().sum(1, keepdim=True) * (scale / 2)


def prepack(q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]):
    """fbgemm's packed form of an (N, K) int8 weight with per-row scales."""
    with warnings.catch_warnings():
        # torch warns that quantized tensor types are deprecated; the packed weight is the form
        # its int8 CPU GEMM takes (see the module docstring for the alternative measured)
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(
            q.contiguous(), scale.double(), torch.zeros(q.shape[0], dtype=torch.long), 0)
        try:
            return torch.ops.quantized.linear_prepack(qw, bias)
        except RuntimeError as e:
            raise MoEUsageError(f"int8 inference needs torch's int8 CPU GEMM (quantized engine "
                                f"{torch.backends.quantized.engine!r} failed: {str(e).splitlines()[0]})") from None


def int8_linear(x: torch.Tensor, packed) -> torch.Tensor:
    """x (..., K) in any float dtype -> (..., N) in x's dtype, through the packed int8 weight."""
    y = torch.ops.quantized.linear_dynamic(x if x.dtype == torch.float32 else x.float(), packed, REDUCE_RANGE)
    return y if y.dtype == x.dtype else y.to(x.dtype)


class InferenceOnly(nn.Module):
    """An int8 module: no gradients reach its integer weights, so training a model that holds
    one would silently train everything else only.  It starts in evaluation mode and refuses
    train() (fairseq-train calls it on the model) in one line."""

    def __init__(self):
        super().__init__()
        self.training = False

    def train(self, mode: bool = True):
        if mode:
            raise MoEUsageError("an int8 model (moe-quantize) is for inference only: train the fp32 checkpoint")
        return super().train(False)


class Int8Linear(InferenceOnly):
    """nn.Linear's forward with an int8 weight (`weight_int8` (N, K), `weight_scale` (N,)).

    The buffers are not named `weight`: code that reads `linear.weight` directly (fairseq's
    attention fast path does) fails loudly instead of receiving int8 numbers."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._packed = None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(*quantize_per_channel(linear.weight), linear.bias)

    def packed(self):
        if self._packed is None:
            self._packed = prepack(self.weight_int8, self.weight_scale, self.bias)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.packed())

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None  # new numbers: pack again on next use

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(InferenceOnly):
    """nn.Embedding's lookup from int8 rows with one scale per row (the same numbers an
    Int8Linear output projection tied to it multiplies with: one int8 copy serves both)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, padding_idx: Optional[int] = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.padding_idx = padding_idx
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> "Int8Embedding":
        return cls(*quantize_per_channel(embedding.weight), embedding.padding_idx)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(tokens, self.weight_int8)  # int8 gather: a quarter of fp32's bytes
        return rows.float().mul_(F.embedding(tokens, self.weight_scale.unsqueeze(1)))

    def tied_linear(self) -> Int8Linear:
        """An output projection (no bias) sharing this embedding's int8 rows and scales."""
        return Int8Linear(self.weight_int8, self.weight_scale)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"


class Int8FFNExperts(InferenceOnly):
    """FFNExperts for inference with int8 weights: expert e is x -> act(x W1[e] + b1[e]) W2[e] + b2[e]
    with W1[e], W2[e] stored per output channel as `w1_int8` (E, F, M) / `w1_scale` (E, F) and
    `w2_int8` (E, M, F) / `w2_scale` (E, M) (the kernel's (out, in) layout), biases fp32.

    The same calls as FFNExperts (forward on rows grouped by expert, `runs_ffn` for the decoder
    step path), for inference: no autograd, no expert dropout."""

    def __init__(self, w1_int8, w1_scale, b1, w2_int8, w2_scale, b2, activation):
        super().__init__()
        self.num_local, self.hidden_dim, self.model_dim = w1_int8.shape
        self.activation = activation
        for name, t in (("w1_int8", w1_int8), ("w1_scale", w1_scale), ("b1", b1), ("w2_int8", w2_int8),
                        ("w2_scale", w2_scale), ("b2", b2)):
            self.register_buffer(name, t.detach().clone() if t.is_floating_point() else t)
        self._packed = None

    @classmethod
    def from_float(cls, experts) -> "Int8FFNExperts":
        """From an FFNExperts (weights stored (E, in, out))."""
        w1_int8, w1_scale = quantize_per_channel(experts.w1.transpose(1, 2))
        w2_int8, w2_scale = quantize_per_channel(experts.w2.transpose(1, 2))
        return cls(w1_int8, w1_scale, experts.b1.float(), w2_int8, w2_scale, experts.b2.float(), experts.activation)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the activations it takes and returns."""
        return torch.float32

    def packed(self) -> List[tuple]:
        if self._packed is None:
            self._packed = [(prepack(self.w1_int8[e], self.w1_scale[e], self.b1[e]),
                             prepack(self.w2_int8[e], self.w2_scale[e], self.b2[e])) for e in range(self.num_local)]
        return self._packed

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None

    def expert(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        p1, p2 = self.packed()[e]
        h = int8_linear(rows, p1)
        h = h.relu_() if self.activation is F.relu else self.activation(h)
        return int8_linear(h, p2)

    def runs_ffn(self, rows: torch.Tensor, runs) -> torch.Tensor:
        """rows grouped by expert, runs = [(expert, start, end)] -> each expert's output on its rows."""
        y = rows.new_empty(rows.shape[0], self.model_dim)
        for e, start, end in runs:
            y[start:end] = self.expert(e, rows[start:end])
        return y

    def takes_device_counts(self, device, dtype) -> bool:
        return False

    def forward(self, x: torch.Tensor, counts, counts_on_device=None) -> torch.Tensor:
        """x (N, M) rows grouped by local expert, counts[e] rows for expert e (list or tensor)."""
        counts = counts.tolist() if isinstance(counts, torch.Tensor) else [int(c) for c in counts]
        if len(counts) > self.num_local:
            raise IndexError(f"{len(counts)} expert counts for {self.num_local} local experts")
        runs, start = [], 0
        for e, c in enumerate(counts):
            if c:
                runs.append((e, start, start + c))
            start += c
        if start != x.shape[0]:
            raise ValueError(f"expert counts sum to {start} but there are {x.shape[0]} rows")
        out = self.runs_ffn(x if x.dtype == torch.float32 else x.float(), runs)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def extra_repr(self):
        return f"experts={self.num_local}, model_dim={self.model_dim}, hidden_dim={self.hidden_dim}, int8"
