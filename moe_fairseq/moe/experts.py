"""Feed-forward experts stored as stacked weights, one GEMM pair per expert.

The forward and backward of all experts are one autograd Function (`_GroupedFFN`) that writes
every expert's GEMM straight into preallocated (N, .) buffers and (E, ., .) weight gradients.
Left to autograd, `w1[e]` per expert costs a zero-filled (E, M, F) gradient per expert and
slot in the backward (O(E^2 M F)), and `torch.cat` one more copy of the output; the Function
does exactly the work of a dense FFN on the same N rows: 2 GEMMs forward, 4 backward.

Mixed precision: under torch.autocast (fairseq's --amp; CPU bf16 or CUDA fp16) the experts
compute in the autocast dtype, as nn.Linear would: `compute_dtype` picks it, the inputs and
weights are cast before the Function (the casts are ordinary autograd ops, so fp32 weights get
fp32 gradients) and the Function itself runs with autocast off, because its `out=` GEMMs are
not autocast ops and would otherwise meet half-precision activations and fp32 weights.
"""
import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from .errors import MoEUsageError
from .torch_version import check_torch_version

check_torch_version()  # the autocast API below needs torch >= 2.4

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}

# Activation derivatives d act(pre) given (grad, pre): for the fused path of every activation
# but relu, whose derivative is read off its (dropped-out) output instead.
_ACTIVATION_BACKWARD = {
    F.gelu: lambda g, pre: torch.ops.aten.gelu_backward(g, pre),
    F.silu: lambda g, pre: torch.ops.aten.silu_backward(g, pre),
    torch.tanh: lambda g, pre: torch.ops.aten.tanh_backward(g, torch.tanh(pre)),
}


GEMM_MODES = ("auto", "loop", "bmm", "grouped", "aligned")


class _Groups:
    """How N rows, grouped by expert, split over E experts, in the form one GEMM mode needs.

    loop:    host split sizes; one addmm / mm per expert with rows (the fallback: any device,
             dtype and shape).
    bmm:     the rows copied into an (E, C, .) zero-padded block, C = the largest count: one
             baddbmm / bmm per GEMM for all experts.  Padding rows are zero in the input and in
             the output gradient, so they add nothing to any weight or bias gradient.
    grouped: torch._grouped_mm with the cumulative counts as offsets, one call per GEMM, no
             padding; the counts may stay on the device (no host sync).
    aligned: the loop, on a copy of the rows in which each expert's block is zero-padded up to a
             multiple of ALIGN_ROWS rows: the GEMMs then take one of a few shapes that recur from
             step to step (half precision on CPU, see ALIGN_ROWS).  Padding rows are zero as in bmm.
    """

    def __init__(self, counts, num_experts: int, n: int, device, mode: str, counts_t=None):
        self.mode, self.num_experts, self.n, self.device = mode, num_experts, n, device
        self._counts_t = counts_t  # the counts on the device when the caller has them (no copy from the host)
        if isinstance(counts, torch.Tensor):
            if mode != "grouped":
                counts = counts.tolist()
            else:
                self._counts_t = counts.to(device=device, dtype=torch.long)
        self.counts = counts if isinstance(counts, list) else None
        if mode == "loop":
            self.groups = [(e, start, c) for e, (start, c) in enumerate(zip(_starts(counts), counts)) if c > 0]
        self._row_expert = None
        self.padded = mode in ("bmm", "aligned")  # the GEMMs see a zero-padded copy of the rows
        if mode == "aligned":
            # Expert e's block starts at a multiple of ALIGN_ROWS and has its rows rounded up to one.
            blocks = [-(-c // ALIGN_ROWS) * ALIGN_ROWS for c in counts]
            self.groups = [(e, start, b) for e, (start, b) in enumerate(zip(_starts(blocks), blocks)) if b > 0]
            self.padded_rows = sum(blocks)
            self._blocks_t = torch.tensor(blocks, dtype=torch.long, device=device)
            # Row i of expert e moves from e's start among the rows to e's block start.
            shift = torch.tensor([b - c for b, c in zip(_starts(blocks), _starts(counts))], device=device)
            self.pos = torch.arange(n, device=device) + shift[self.row_expert]
        elif mode == "bmm":
            self.capacity = max(counts)
            starts = torch.cumsum(self.counts_t, 0) - self.counts_t
            # Row i of expert e (i-th overall, r-th of its expert) sits at e * C + r.
            shift = torch.arange(len(counts), device=device) * self.capacity - starts
            self.pos = torch.arange(n, device=device) + shift[self.row_expert]
        elif mode == "grouped":
            offs = torch.cumsum(self.counts_t, 0).to(torch.int32)
            if len(offs) < num_experts:  # fewer counts than experts: the last ones get no rows
                offs = torch.cat([offs, offs[-1:].expand(num_experts - len(offs)) if len(offs) else
                                  offs.new_zeros(num_experts - len(offs))])
            self.offs = offs

    @property
    def counts_t(self) -> torch.Tensor:
        if self._counts_t is None:
            self._counts_t = torch.tensor(self.counts, dtype=torch.long, device=self.device)
        return self._counts_t

    @property
    def row_expert(self) -> torch.Tensor:
        """Expert of each row (bias gradients, the grouped GEMM's bias, the bmm's padding map).
        Made on first use: a loop-mode forward without autograd (a decoder step) needs none, and
        repeat_interleave is one of the dearer small ops."""
        if self._row_expert is None:
            self._row_expert = torch.repeat_interleave(torch.arange(len(self.counts_t), device=self.device),
                                                       self.counts_t, output_size=self.n)
        return self._row_expert

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """(N, d) rows -> the zero-padded copy: (E, C, d) in bmm mode, (padded rows, d) in aligned mode."""
        if self.mode == "aligned":
            return t.new_zeros(self.padded_rows, t.shape[1]).index_copy_(0, self.pos, t)
        out = t.new_zeros(self.num_experts * self.capacity, t.shape[1])
        return out.index_copy_(0, self.pos, t).view(self.num_experts, self.capacity, t.shape[1])

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1]).index_select(0, self.pos)

    # The two GEMM shapes of an expert FFN, in this mode's form.  Row tensors are (N, d) in loop
    # and grouped mode and the (E, C, d) padded block in bmm mode.

    def rows_mm(self, a: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Each expert's rows of `a` times its matrix w[e] (E, d_in, d_out), plus bias[e] (E, d_out)."""
        if self.mode == "bmm":
            return torch.bmm(a, w) if bias is None else torch.baddbmm(bias.unsqueeze(1), a, w)
        if self.mode == "grouped":
            y = torch._grouped_mm(a, w, offs=self.offs)
            return y if bias is None else y.add_(bias.index_select(0, self.row_expert))
        y = a.new_empty(a.shape[0], w.shape[2])
        for e, start, c in self.groups:
            if bias is None:
                torch.mm(a[start:start + c], w[e], out=y[start:start + c])
            else:
                torch.addmm(bias[e], a[start:start + c], w[e], out=y[start:start + c])
        return y

    def weight_mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per expert, its rows of `a` transposed times its rows of `b`: (E, d_a, d_b), zero for an
        expert without rows (a weight gradient)."""
        if self.mode == "bmm":
            return torch.bmm(a.transpose(1, 2), b)
        if self.mode == "grouped":
            return torch._grouped_mm(a.t(), b, offs=self.offs)
        # every expert with rows writes its whole slice; only the others need zeros
        g = a.new_empty(self.num_experts, a.shape[1], b.shape[1])
        used = {e for e, _, _ in self.groups}
        for e in range(self.num_experts):
            if e not in used:
                g[e].zero_()
        for e, start, c in self.groups:
            torch.mm(a[start:start + c].t(), b[start:start + c], out=g[e])
        return g

    def bias_grad(self, g: torch.Tensor) -> torch.Tensor:
        """Per expert, the sum of its rows of `g`: (E, d)."""
        if self.mode == "bmm":
            return g.sum(1)
        row_expert = self.row_expert
        if self.mode == "aligned":  # padding rows of g are zero: summed with their block's expert
            row_expert = torch.repeat_interleave(torch.arange(len(self._blocks_t), device=self.device),
                                                 self._blocks_t, output_size=self.padded_rows)
        return g.new_zeros(self.num_experts, g.shape[-1]).index_add_(0, row_expert, g)


class _GroupedFFN(torch.autograd.Function):
    """y[rows of e] = act(x[rows of e] @ w1[e] + b1[e]) (dropout) @ w2[e] + b2[e], with rows
    grouped by expert (counts[e] consecutive rows for expert e).

    The GEMMs are done as `groups.mode` says (see _Groups); activation, dropout, their
    derivatives and the bias gradients are single ops over all rows (fewer, larger kernels:
    each parallel region has a fixed cost, large when the cores are shared).  The dropout mask
    is drawn over the N rows in every mode, so the modes agree under the same seed."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, groups: _Groups, activation, dropout_p: float):
        is_relu = activation is F.relu
        x_in = groups.pad(x) if groups.padded else x
        pre = groups.rows_mm(x_in, w1, b1)  # (N, F), or (E, C, F) padded
        if is_relu:
            h = pre.relu_()
        else:
            h = activation(pre)
        mask = None
        scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
        if dropout_p > 0:
            mask = x.new_empty(x.shape[0], w1.shape[2]).bernoulli_(1.0 - dropout_p)
            if groups.padded:
                mask = groups.pad(mask)
            h.mul_(mask).mul_(scale)
            if is_relu:
                mask = None  # not needed: see below
        y = groups.rows_mm(h, w2, b2)
        if groups.padded:
            y = groups.unpad(y)
        ctx.groups, ctx.activation, ctx.scale = groups, activation, scale
        # For relu, h (after dropout) alone gives both d/dw2 and the derivative mask: h > 0
        # exactly where pre > 0 and the unit was not dropped.
        ctx.save_for_backward(x_in, w1, w2, h, None if is_relu else pre, mask)
        return y

    @staticmethod
    def backward(ctx, gy):
        # Every saved tensor has the forward's dtype; a backward called inside an autocast
        # region must not recast them (the forward ran with autocast off too).
        with torch.autocast(gy.device.type, enabled=False):
            return _GroupedFFN._backward(ctx, gy)

    @staticmethod
    def _backward(ctx, gy):
        x, w1, w2, h, pre, mask = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        groups = ctx.groups
        padded = groups.padded
        # zero at padding: padding rows add nothing below
        gy_in = groups.pad(gy.contiguous()) if padded else gy.contiguous()
        gb2 = groups.bias_grad(gy_in) if need_b2 else None
        gw2 = groups.weight_mm(h, gy_in) if need_w2 else None
        gw1 = gx = gb1 = None
        if need_x or need_w1 or need_b1:
            gh = groups.rows_mm(gy_in, w2.transpose(1, 2))
            if ctx.activation is F.relu:
                torch.ops.aten.threshold_backward.grad_input(gh, h, 0, grad_input=gh)
                if ctx.scale != 1.0:
                    gh.mul_(ctx.scale)
            else:
                if mask is not None:
                    gh.mul_(mask).mul_(ctx.scale)
                gh = _ACTIVATION_BACKWARD[ctx.activation](gh, pre)
            if need_b1:
                gb1 = groups.bias_grad(gh)
            if need_w1:
                gw1 = groups.weight_mm(x, gh)
            if need_x:
                gx = groups.rows_mm(gh, w1.transpose(1, 2))
                if padded:
                    gx = groups.unpad(gx)
        return gx, gw1, gb1, gw2, gb2, None, None, None


# gemm="auto" on CPU: the padded bmm when every expert has rows and padding adds at most this
# many rows per expert (E * max(counts) - N <= BMM_MAX_PAD_ROWS * E), else the per-expert loop.
# Why (docs/benchmarks.md, "Expert GEMM modes"): the bmm costs about (padded rows / N) times
# its unpadded time, and saves the loop's fixed cost per expert GEMM, worth about 10 rows of
# work per expert (break-even padding 1.3x at 32 rows per expert, 1.1x at 128, none at 512);
# an expert without rows costs the loop nothing but the bmm a full read of its weights
# (decoder steps: a few rows, most experts empty).  torch._grouped_mm on CPU measured as the
# loop (it loops over the groups inside), so auto uses it on CUDA only.
BMM_MAX_PAD_ROWS = 10
# ... and at most this share of N: with a few rows per expert (decoder steps at k = 2: 32-64
# rows over 16 experts) 10 padding rows per expert double the work, and the bmm measured
# 1.07-1.19x slower than the loop there (docs/benchmarks.md, decoder steps); the 1.3x matches
# the break-even at 32 rows per expert above.
BMM_MAX_PAD_SHARE = 0.3
# gemm="auto" on CPU in half precision (bf16, fp16): the aligned loop.  There torch runs the
# GEMMs through oneDNN, which builds a kernel for every new GEMM shape (then caches it); with each
# expert's row count new at every step, the plain loop paid about 10 ms of CPU time per expert
# GEMM for that, more than the GEMM itself (bf16 experts' forward + backward, 16 experts of
# ~1000 rows, M = 512, F = 2048: 1650 ms loop, 635 ms aligned; docs/benchmarks.md, "MoE layer
# against DeepSpeed-MoE and torchtitan").  Rows rounded up to a multiple of ALIGN_ROWS give a
# few shapes that recur and hit the cache, for at most ALIGN_ROWS - 1 padding rows per expert
# (16, 32 and 64 measured alike).  fp32 GEMMs run in MKL, which builds nothing per shape.
ALIGN_ROWS = 32


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, model_dim: int, hidden_dim: int) -> bool:
    """Whether torch._grouped_mm runs the experts' GEMMs here: it needs fp32/bf16/fp16 on CPU
    (bf16 on CUDA, compute capability 9.0 and later) and row strides that are multiples of 16
    bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    elem = torch.empty((), dtype=dtype).element_size()
    if (model_dim * elem) % 16 or (hidden_dim * elem) % 16:
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return False


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's when it is on for x's device, else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _starts(counts: Sequence[int]) -> List[int]:
    starts, total = [], 0
    for c in counts:
        starts.append(total)
        total += c
    return starts


class FFNExperts(nn.Module):
    """`num_local` experts M -> F -> M.  Every parameter carries `expert = True`, fairseq's mark
    for weights that live on one rank and must stay out of the data-parallel all-reduce.

    expert_dropout: dropout on the hidden activations inside the experts only (Switch
    fine-tuning uses e.g. 0.4 here against 0.1 elsewhere).
    """

    def __init__(self, num_local: int, model_dim: int, hidden_dim: int, activation: str = "relu",
                 expert_dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise MoEUsageError(f"--activation-fn for experts must be one of {', '.join(ACTIVATIONS)} (got {activation!r})")
        if not 0 <= expert_dropout < 1:  # --moe-expert-dropout's rule is MoEConfig's
            raise ValueError(f"FFNExperts: expert_dropout must be in [0, 1) (got {expert_dropout})")
        self.num_local, self.model_dim, self.hidden_dim = num_local, model_dim, hidden_dim
        self.activation = ACTIVATIONS[activation]
        self.expert_dropout = expert_dropout
        self.gemm = "auto"  # GEMM mode (GEMM_MODES); "auto" chooses per call, see gemm_mode
        # Stored as (in, out) so each expert is a plain addmm without a transpose.
        self.w1 = nn.Parameter(torch.empty(num_local, model_dim, hidden_dim))
        self.b1 = nn.Parameter(torch.empty(num_local, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_local, hidden_dim, model_dim))
        self.b2 = nn.Parameter(torch.empty(num_local, model_dim))
        for p in self.parameters():
            p.expert = True
        self.reset_parameters()

    def reset_parameters(self, global_ids: Optional[List[int]] = None, seed: Optional[int] = None):
        """nn.Linear's default init per expert, like fairseq's dense fc1/fc2.

        With `global_ids` and `seed`, expert g is drawn from its own generator seeded by
        (seed, g): a global expert then starts from the same weights whatever the world size,
        so an expert-parallel model starts equal to its single-process twin (otherwise every
        rank, seeded alike, would start its local experts as copies of the other ranks')."""
        params = ((self.w1, self.b1, self.model_dim), (self.w2, self.b2, self.hidden_dim))
        if global_ids is None or seed is None:
            for w, b, fan_in in params:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(w, -bound, bound)
                nn.init.uniform_(b, -bound, bound)
            return
        with torch.no_grad():
            for local, g in enumerate(global_ids):
                gen = torch.Generator().manual_seed((seed * 1_000_003 + g) % (2 ** 63))
                for w, b, fan_in in params:
                    bound = 1.0 / math.sqrt(fan_in)
                    w[local].copy_(torch.empty(w.shape[1:]).uniform_(-bound, bound, generator=gen))
                    b[local].copy_(torch.empty(b.shape[1:]).uniform_(-bound, bound, generator=gen))

    def forward(self, x: torch.Tensor, counts, counts_on_device: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (N, M) rows grouped by local expert, counts[e] rows for expert e (a list, or a
        1-D tensor on x's device: then the grouped GEMM mode needs no host sync).  With a list,
        counts_on_device may hold the same counts on x's device, so that the modes that need
        them there (bmm, bias gradients) do not copy the list over."""
        on_device = isinstance(counts, torch.Tensor)
        if not on_device:
            counts = [int(c) for c in counts]
            if sum(counts) != x.shape[0] or min(counts, default=0) < 0:
                torch.split(x, counts)  # raises torch's own error for sizes that do not split x
        if len(counts) > self.num_local:
            raise IndexError(f"{len(counts)} expert counts for {self.num_local} local experts")
        if x.shape[0] > 0 and (self.activation is F.relu or self.activation in _ACTIVATION_BACKWARD):
            p = self.expert_dropout if self.training else 0.0
            dtype = compute_dtype(x)
            mode = self.gemm_mode(x.device, dtype, counts)
            device_counts = None
            if counts_on_device is not None and not on_device and len(counts_on_device) == len(counts):
                device_counts = counts_on_device.to(device=x.device, dtype=torch.long)
            groups = _Groups(counts, self.num_local, x.shape[0], x.device, mode, device_counts)
            w1, b1, w2, b2 = (t if t.dtype == dtype else t.to(dtype) for t in (self.w1, self.b1, self.w2, self.b2))
            with torch.autocast(x.device.type, enabled=False):
                return _GroupedFFN.apply(x if x.dtype == dtype else x.to(dtype), w1, b1, w2, b2, groups,
                                         self.activation, p)
        if on_device:
            counts = counts.tolist()
        # Generic path (custom activation, or no rows at all).  unbind, not w[e]: one stacked
        # gradient per weight instead of a zero-filled (E, ., .) tensor per expert.
        w1, b1, w2, b2 = (t.unbind(0) for t in (self.w1, self.b1, self.w2, self.b2))
        outs = []
        for e, rows in enumerate(torch.split(x, counts)):
            if rows.shape[0] == 0:
                continue
            h = self.activation(torch.addmm(b1[e], rows, w1[e]))
            if self.expert_dropout > 0:
                h = F.dropout(h, self.expert_dropout, self.training)
            outs.append(torch.addmm(b2[e], h, w2[e]))
        if not outs:
            return x.new_zeros(0, self.model_dim) + 0 * self.b2.sum()
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the activations the decoder-step path hands it (its weights')."""
        return self.w1.dtype

    def runs_ffn(self, rows: torch.Tensor, runs) -> torch.Tensor:
        """Inference on rows grouped by expert, runs = [(expert, start, end)]: each expert's
        output on its rows (moe/decode.py's decoder steps).  Written in place: one GEMM per
        expert and layer, the activation once over all rows."""
        w1, b1, w2, b2 = self.w1, self.b1, self.w2, self.b2
        h = rows.new_empty(rows.shape[0], self.hidden_dim)
        y = rows.new_empty(rows.shape[0], self.model_dim)
        for e, start, end in runs:
            torch.addmm(b1[e], rows[start:end], w1[e], out=h[start:end])
        h = h.relu_() if self.activation is F.relu else self.activation(h)
        for e, start, end in runs:
            torch.addmm(b2[e], h[start:end], w2[e], out=y[start:end])
        return y

    def takes_device_counts(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether forward would use the grouped GEMM, which reads the split sizes on the
        device: on CUDA where torch._grouped_mm supports the dtype, or when set explicitly."""
        if self.gemm == "grouped":
            return True
        return (self.gemm == "auto" and device.type == "cuda"
                and grouped_mm_supported(device, dtype, self.model_dim, self.hidden_dim))

    def gemm_mode(self, device: torch.device, dtype: torch.dtype, counts) -> str:
        """The GEMM mode of one call: `self.gemm` unless "auto"; see BMM_MAX_PAD_ROWS,
        BMM_MAX_PAD_SHARE and ALIGN_ROWS for auto."""
        mode = self.gemm
        if mode not in GEMM_MODES:
            raise MoEUsageError(f"FFNExperts.gemm must be one of {', '.join(GEMM_MODES)} (got {mode!r})")
        if mode == "grouped":
            if not grouped_mm_supported(device, dtype, self.model_dim, self.hidden_dim):
                raise MoEUsageError(f"the grouped expert GEMM (torch._grouped_mm) does not support {dtype} on "
                                    f"{device.type} with model dim {self.model_dim} and hidden dim "
                                    f"{self.hidden_dim}; use gemm='auto'")
            return mode
        if mode != "auto":
            return mode
        if isinstance(counts, torch.Tensor):
            if device.type == "cuda" and grouped_mm_supported(device, dtype, self.model_dim, self.hidden_dim):
                return "grouped"  # counts stay on the GPU: no host sync
            counts = counts.tolist()
        if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            return "aligned"
        n, e = sum(counts), len(counts)
        pad = e * max(counts) - n if counts else 0
        if e == self.num_local and min(counts) > 0 and pad <= min(BMM_MAX_PAD_ROWS * e, BMM_MAX_PAD_SHARE * n):
            return "bmm"
        return "loop"

    @classmethod
    def split_dense(cls, fc1: nn.Linear, fc2: nn.Linear, num_experts: int, activation="relu",
                    expert_dropout=0.0) -> "FFNExperts":
        """E experts of hidden size F/E holding exactly the dense FFN's weights (SMoE-Dropout's
        parameter-matched setting).  With every expert active and all gates equal to 1 the sum
        of the experts reproduces the dense FFN, except that fc2's bias is added E times: it is
        divided by E here so that this identity holds."""
        hidden = fc1.out_features
        if hidden % num_experts:
            raise MoEUsageError(f"--encoder/decoder-ffn-embed-dim={hidden} is not divisible by "
                             f"--moe-expert-count={num_experts}")
        experts = cls(num_experts, fc1.in_features, hidden // num_experts, activation, expert_dropout)
        with torch.no_grad():
            experts.w1.copy_(fc1.weight.t().reshape(fc1.in_features, num_experts, -1).transpose(0, 1))
            experts.b1.copy_(fc1.bias.view(num_experts, -1))
            experts.w2.copy_(fc2.weight.t().reshape(num_experts, -1, fc2.out_features))
            experts.b2.copy_(fc2.bias.unsqueeze(0).expand(num_experts, -1) / num_experts)
        return experts
