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

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}

# Activation derivatives d act(pre) given (grad, pre): for the fused path of every activation
# but relu, whose derivative is read off its (dropped-out) output instead.
_ACTIVATION_BACKWARD = {
    F.gelu: lambda g, pre: torch.ops.aten.gelu_backward(g, pre),
    F.silu: lambda g, pre: torch.ops.aten.silu_backward(g, pre),
    torch.tanh: lambda g, pre: torch.ops.aten.tanh_backward(g, torch.tanh(pre)),
}


class _GroupedFFN(torch.autograd.Function):
    """y[rows of e] = act(x[rows of e] @ w1[e] + b1[e]) (dropout) @ w2[e] + b2[e], with rows
    grouped by expert (counts[e] consecutive rows for expert e).

    Only the GEMMs are per expert; activation, dropout, their derivatives and the bias
    gradients are single ops over all N rows (fewer, larger kernels: each parallel region has
    a fixed cost, large when the cores are shared)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, counts: Sequence[int], activation, dropout_p: float):
        n, hidden, model_dim = x.shape[0], w1.shape[2], w2.shape[2]
        groups = [(e, start, c) for e, (start, c) in enumerate(zip(_starts(counts), counts)) if c > 0]
        is_relu = activation is F.relu
        h = x.new_empty(n, hidden)
        pre = h if is_relu else x.new_empty(n, hidden)
        for e, start, c in groups:
            torch.addmm(b1[e], x[start:start + c], w1[e], out=pre[start:start + c])
        if is_relu:
            h.relu_()
        else:
            h.copy_(activation(pre))
        mask = None
        scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
        if dropout_p > 0:
            mask = torch.empty_like(h).bernoulli_(1.0 - dropout_p)
            h.mul_(mask).mul_(scale)
            if is_relu:
                mask = None  # not needed: see below
        y = x.new_empty(n, model_dim)
        for e, start, c in groups:
            torch.addmm(b2[e], h[start:start + c], w2[e], out=y[start:start + c])
        ctx.counts, ctx.activation, ctx.scale = tuple(counts), activation, scale
        # For relu, h (after dropout) alone gives both d/dw2 and the derivative mask: h > 0
        # exactly where pre > 0 and the unit was not dropped.
        ctx.save_for_backward(x, w1, w2, h, None if is_relu else pre, mask)
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
        counts = ctx.counts
        groups = [(e, start, c) for e, (start, c) in enumerate(zip(_starts(counts), counts)) if c > 0]
        num_experts = w1.shape[0]
        gy = gy.contiguous()
        # Every expert with rows writes its whole GEMM slice; only the others need zeros.
        gw1 = torch.empty_like(w1) if need_w1 else None
        gw2 = torch.empty_like(w2) if need_w2 else None
        for e in range(num_experts):
            if e >= len(counts) or counts[e] == 0:
                for g in (gw1, gw2):
                    if g is not None:
                        g[e].zero_()
        row_expert = None
        if need_b1 or need_b2:
            row_expert = torch.repeat_interleave(torch.arange(len(counts), device=x.device),
                                                 torch.tensor(counts, device=x.device), output_size=x.shape[0])
        gb2 = w2.new_zeros(num_experts, w2.shape[2]).index_add_(0, row_expert, gy) if need_b2 else None
        if need_w2:
            for e, start, c in groups:
                torch.mm(h[start:start + c].t(), gy[start:start + c], out=gw2[e])
        gx = gb1 = None
        if need_x or need_w1 or need_b1:
            gh = h.new_empty(h.shape)
            for e, start, c in groups:
                torch.mm(gy[start:start + c], w2[e].t(), out=gh[start:start + c])
            if ctx.activation is F.relu:
                torch.ops.aten.threshold_backward.grad_input(gh, h, 0, grad_input=gh)
                if ctx.scale != 1.0:
                    gh.mul_(ctx.scale)
            else:
                if mask is not None:
                    gh.mul_(mask).mul_(ctx.scale)
                gh = _ACTIVATION_BACKWARD[ctx.activation](gh, pre)
            if need_b1:
                gb1 = w1.new_zeros(num_experts, w1.shape[2]).index_add_(0, row_expert, gh)
            if need_w1:
                for e, start, c in groups:
                    torch.mm(x[start:start + c].t(), gh[start:start + c], out=gw1[e])
            if need_x:
                gx = torch.empty_like(x)
                for e, start, c in groups:
                    torch.mm(gh[start:start + c], w1[e].t(), out=gx[start:start + c])
        return gx, gw1, gb1, gw2, gb2, None, None, None


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
        if not 0 <= expert_dropout < 1:
            raise MoEUsageError(f"--moe-expert-dropout must be in [0, 1) (got {expert_dropout})")
        self.num_local, self.model_dim, self.hidden_dim = num_local, model_dim, hidden_dim
        self.activation = ACTIVATIONS[activation]
        self.expert_dropout = expert_dropout
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

    def forward(self, x: torch.Tensor, counts: List[int]) -> torch.Tensor:
        """x: (N, M) rows grouped by local expert, counts[e] rows for expert e."""
        counts = [int(c) for c in counts]
        if sum(counts) != x.shape[0] or min(counts, default=0) < 0:
            torch.split(x, counts)  # raises torch's own error for sizes that do not split x
        if len(counts) > self.num_local:
            raise IndexError(f"{len(counts)} expert counts for {self.num_local} local experts")
        if x.shape[0] > 0 and (self.activation is F.relu or self.activation in _ACTIVATION_BACKWARD):
            p = self.expert_dropout if self.training else 0.0
            dtype = compute_dtype(x)
            w1, b1, w2, b2 = (t.to(dtype) for t in (self.w1, self.b1, self.w2, self.b2))
            with torch.autocast(x.device.type, enabled=False):
                return _GroupedFFN.apply(x.to(dtype), w1, b1, w2, b2, counts, self.activation, p)
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
