"""Histograms of expert ids that stay on the device.

`torch.bincount` sizes its output from the largest id, which on CUDA means reading max(ids)
back to the host before the kernel can run: a host sync each call, and two with `minlength`
(it also checks for negative ids).  A MoE layer needs three such histograms per forward (the
capacity queue, the dispatch split, the balance loss), so each would stall the stream.  Here the
number of bins is known (E, or E + 1 with the sentinel of dropped slots), so a scatter-add into
a zeroed vector of that size does the same work with no read-back.
"""
import torch


def histogram(ids: torch.Tensor, bins: int) -> torch.Tensor:
    """(bins,) int64 counts of the values of `ids` (int64, each in [0, bins)); no host sync.

    Equal to torch.bincount(ids.reshape(-1), minlength=bins) for such ids.  Integer atomics
    make it exact and deterministic on CUDA too."""
    flat = ids.reshape(-1)
    out = torch.zeros(bins, dtype=torch.long, device=flat.device)
    return out.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.long))
