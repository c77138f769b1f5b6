"""The MoE layer's path for decoder steps on CPU: a handful of rows, no autograd.

An incremental decoder step hands each MoE layer one row per hypothesis (1 at batch 1 greedy,
5 with beam 5).  The general path (sort, bincount, split sizes, the grouped-GEMM Function,
index_add) then costs far more than the expert GEMMs themselves, and so does every GEMM's
parallel region: docs/benchmarks.md ("Decoding") measured a MoE decoder call at batch 1 at
5x a dense FFN, and one expert's pair of one-row GEMMs at 0.083 ms on 2 threads against 0.018
ms on one.

So a call that `applies` gets three things:
- one intra-op thread for the whole call (router and experts): a parallel region's fixed cost
  (waking the other threads) exceeds the work of a GEMM of a few rows;
- the router's forward with AuxMode.NONE (no losses, no softmax kept for statistics), of which
  it reads the expert ids and gates;
- `few_rows_ffn`: the slots grouped by expert on the host (a few Python ints), one GEMM pair per
  expert used, written in place, and the gate-weighted sum of each token's k outputs as one
  batched product (for a single row, k scaled adds); no sort, no bincount, no scatter.

Numerically it is the general path's computation (the same GEMMs per expert, the combine in
fp32); tests/test_decode.py compares the two and a per-token brute force.

torch's intra-op thread count is per process: a program that runs several models in Python
threads at once would see it drop to 1 while a MoE decoder step runs.  Such a program sets
`MoELayer.decode_fast_path = False` (the general dispatch, on the caller's threads).
"""
import contextlib
import itertools

import torch

from .aux_mode import AuxMode
from .experts import FFNExperts

# A call of at most this many tokens is a decoder step.  Measured on the 2-core host
# (docs/benchmarks.md, "Decoding"): one thread is faster for a MoE layer call up to 64-80
# rows; 32 leaves room for hosts whose threads are cheaper to wake.
DECODE_MAX_TOKENS = 32


def applies(layer, tokens: torch.Tensor, aux_mode: AuxMode) -> bool:
    """Whether a call of `layer` on `tokens` in `aux_mode` takes the decoder-step path:
    evaluation without autograd, losses or statistics (AuxMode.NONE), on CPU, every expert local,
    a router that keeps every slot (dropless evaluation), no autocast, and at most
    DECODE_MAX_TOKENS rows."""
    experts = layer.experts
    return (aux_mode is AuxMode.NONE and not layer.training and layer.decode_fast_path
            and 0 < tokens.shape[0] <= DECODE_MAX_TOKENS
            and tokens.device.type == "cpu" and not torch.is_grad_enabled()
            and layer.comm.world_size == 1
            and layer.router.eval_keeps_all_slots and layer.router.current_capacity_factor() is None
            and not torch.is_autocast_enabled("cpu")
            and tokens.dtype == experts.weight_dtype)


@contextlib.contextmanager
def one_intra_op_thread():
    """torch's intra-op thread count set to 1 inside the block and restored after it."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def few_rows_ffn(experts, x: torch.Tensor, expert_index: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """out[s] = sum_j gate[s, j] * FFN_{expert_index[s, j]}(x[s]) for the S rows of x, with every
    expert of `experts` (an FFNExperts, or int8.Int8FFNExperts) local.  Inference only: no
    autograd, no dropout."""
    n, k = expert_index.shape
    ids = expert_index.reshape(-1).tolist()  # a handful of ints: the one host read
    if n == 1 and isinstance(experts, FFNExperts):
        # One token (greedy search at batch 1): its k experts are distinct (Routing), each runs
        # on the row, and the outputs are summed with the gates read as host scalars, in fp32
        # as dispatch.combine: the fewest kernels a MoE call can launch.
        w1, b1, w2, b2 = experts.w1, experts.b1, experts.w2, experts.b2
        relu = experts.activation is torch.nn.functional.relu
        out = None
        for e, g in zip(ids, gate.reshape(-1).tolist()):
            h = torch.addmm(b1[e], x, w1[e])
            y = torch.addmm(b2[e], h.relu_() if relu else experts.activation(h), w2[e]).float()
            out = y.mul_(g) if out is None else out.add_(y, alpha=g)
        return out.to(x.dtype)
    # Slots grouped by expert (stable: each expert's rows in token order).
    order = sorted(range(n * k), key=ids.__getitem__)
    rows = x.index_select(0, torch.tensor([i // k for i in order], device=x.device))
    runs = []  # (expert, first, last + 1) position of each expert's rows
    start = 0
    for e, group in itertools.groupby(ids[i] for i in order):
        end = start + sum(1 for _ in group)
        runs.append((e, start, end))
        start = end
    y = experts.runs_ffn(rows, runs)
    if order != list(range(n * k)):
        inverse = [0] * (n * k)
        for position, slot in enumerate(order):
            inverse[slot] = position
        y = y.index_select(0, torch.tensor(inverse, device=x.device))  # back to slot order
    # The combine in fp32 at least (as dispatch.combine): one batched (1 x k) @ (k x M) per token.
    dtype = torch.promote_types(y.dtype, torch.float32)
    out = torch.bmm(gate.to(dtype).view(n, 1, k), y.to(dtype).view(n, k, -1)).view(n, -1)
    return out.to(x.dtype)
