"""Routing statistics of one MoE layer in one forward pass.

Everything here is a detached tensor computed with cheap reductions; nothing is copied to the
host until a consumer (the criterion's logging) asks, so leaving statistics on costs no sync.
"""
from dataclasses import dataclass
from typing import Dict, Iterable, Optional

import torch


@dataclass
class RoutingStats:
    num_tokens: torch.Tensor  # non-padding tokens seen by the layer
    requested_slots: torch.Tensor  # tokens * k
    tokens_per_expert: torch.Tensor  # (E,) slots processed by each global expert
    dropped_by_capacity: torch.Tensor  # slots removed by capacity
    gate_entropy_sum: torch.Tensor  # sum over tokens of the router distribution's entropy
    gating_dropped: torch.Tensor  # 1. if Gating Dropout skipped the router this step
    a2a_bytes: torch.Tensor  # bytes this rank sends to other ranks (dispatch + return)


def entropy_sum(probs: Optional[torch.Tensor]) -> torch.Tensor:
    if probs is None:
        return torch.zeros(())
    p = probs.detach().float()
    return -(p * torch.log(p.clamp_min(1e-20))).sum()


def summarize(stats: Iterable[RoutingStats]) -> Dict[str, float]:
    """Scalars for logging, aggregated over layers (host sync happens here, once)."""
    stats = list(stats)
    if not stats:
        return {}
    out = {"moe_layers": float(len(stats))}
    cvs, maxmeans, dropped, requested, entropy, tokens, gd, a2a = [], [], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    for s in stats:
        t = s.tokens_per_expert.float()
        mean = t.mean()
        if mean > 0:
            cvs.append((t.std(unbiased=False) / mean).item())
            maxmeans.append((t.max() / mean).item())
        dropped += float(s.dropped_by_capacity)
        requested += float(s.requested_slots)
        entropy += float(s.gate_entropy_sum)
        tokens += float(s.num_tokens)
        gd += float(s.gating_dropped)
        a2a += float(s.a2a_bytes)
    if cvs:
        out["moe_load_cv"] = sum(cvs) / len(cvs)
        out["moe_load_max_mean"] = sum(maxmeans) / len(maxmeans)
    out["moe_overflow"] = dropped / requested if requested else 0.0
    out["moe_gate_entropy"] = entropy / tokens if tokens else 0.0
    out["moe_gating_dropped"] = gd / len(stats)
    out["moe_a2a_bytes"] = a2a
    return out
