"""Differentiable uneven all-to-all for expert parallelism (NCCL on GPU, gloo on CPU).

Every rank sends `input_split_sizes[d]` rows to rank d and receives `output_split_sizes[s]`
rows from rank s, exactly the rows it needs: no rank is padded to a global maximum (fairseq's
MoE branch all-reduces the max token count and pads; DeepSpeed's dropless mode does the same).
The split sizes must be known on the host, so the per-expert counts are exchanged first
(`exchange_counts`, a small int64 all-to-all), which is the one host sync of the exchange.

Backward is the same collective with the splits swapped: the gradient of a row goes back to
the rank the row came from.
"""
from typing import List, Optional

import torch
import torch.distributed as dist


class A2AStats:
    """What a communicator passed to `all_to_all_single`: calls and bytes of the input tensors
    (`bytes_sent` includes the split this rank sends to itself; `remote_bytes_sent` does not).
    Forward and backward collectives are both counted."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.calls = 0
        self.bytes_sent = 0
        self.remote_bytes_sent = 0

    def record(self, x: torch.Tensor, input_split_sizes: List[int], self_rank: int):
        self.calls += 1
        nbytes = x.numel() * x.element_size()
        self.bytes_sent += nbytes
        if x.shape[0]:
            self.remote_bytes_sent += nbytes - input_split_sizes[self_rank] * (nbytes // x.shape[0])


def _all_to_all(x: torch.Tensor, output_split_sizes: List[int], input_split_sizes: List[int],
                group, stats: Optional[A2AStats]) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(output_split_sizes),) + tuple(x.shape[1:]))
    if stats is not None:
        stats.record(x, input_split_sizes, dist.get_rank(group))
    dist.all_to_all_single(out, x, output_split_sizes=output_split_sizes,
                           input_split_sizes=input_split_sizes, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """y = all_to_all(x); dL/dx = all_to_all(dL/dy) with output and input splits swapped."""

    @staticmethod
    def forward(ctx, x, output_split_sizes, input_split_sizes, group=None, stats=None):
        ctx.output_split_sizes, ctx.input_split_sizes = output_split_sizes, input_split_sizes
        ctx.group, ctx.stats = group, stats
        return _all_to_all(x, output_split_sizes, input_split_sizes, group, stats)

    @staticmethod
    def backward(ctx, grad):
        return (_all_to_all(grad, ctx.input_split_sizes, ctx.output_split_sizes, ctx.group, ctx.stats),
                None, None, None, None)


def all_to_all(x: torch.Tensor, output_split_sizes: List[int], input_split_sizes: List[int],
               group=None, stats: Optional[A2AStats] = None) -> torch.Tensor:
    """Differentiable uneven all-to-all of the rows of x (dim 0).

    input_split_sizes[d]: rows of x (consecutive, in rank order) sent to rank d;
    output_split_sizes[s]: rows received from rank s, returned in rank order.
    Every rank of `group` must call this, and all must agree on whether x requires grad (the
    backward collective runs only where it does).
    """
    return AllToAll.apply(x, list(output_split_sizes), list(input_split_sizes), group, stats)


def exchange_counts(send_counts: torch.Tensor, group=None, stats: Optional[A2AStats] = None) -> torch.Tensor:
    """send_counts: (W * K,) int64, K counts for each destination rank (rank-major).  Returns
    the (W * K,) counts received, K from each source rank (rank-major).  Not differentiable.
    The tensor lives on the communication device (CUDA for NCCL)."""
    world = dist.get_world_size(group)
    send = send_counts.to(torch.int64).contiguous()
    if send.numel() % world:
        raise ValueError(f"exchange_counts: {send.numel()} counts do not split evenly over {world} ranks")
    k = send.numel() // world
    return _all_to_all(send, [k] * world, [k] * world, group, stats)
