"""Routing statistics of one MoE layer in one forward pass.

Everything here is a detached tensor computed with cheap reductions; nothing is copied to the
host until a consumer (the criterion's logging) asks, so leaving statistics on costs no sync,
and `summarize` reads every layer's in one transfer.
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


def entropy_sum(probs: Optional[torch.Tensor], device=None) -> torch.Tensor:
    if probs is None:
        return torch.zeros((), device=device)
    p = probs.detach().float()
    return -(p * torch.log(p.clamp_min(1e-20))).sum()


def summarize(stats: Iterable[RoutingStats], per_layer: bool = False) -> Dict[str, float]:
    """Scalars for logging, aggregated over layers.  Every layer's numbers are computed on the
    device and read on the host in one transfer, whatever the number of layers.  With
    per_layer, out["layers"] also holds one dict per layer (in the order given): its load_cv,
    load_max_mean, overflow (the share of its requested slots dropped by capacity),
    gating_dropped and expert_load (each expert's share of the slots it processed)."""
    stats = list(stats)
    if not stats:
        return {}
    rows = []
    for s in stats:
        t = s.tokens_per_expert.float()
        mean = t.mean()
        used = mean > 0  # a layer that routed nothing has no load balance to report
        safe_mean = torch.where(used, mean, torch.ones_like(mean))
        row = [used.float(), t.std(unbiased=False) / safe_mean, t.max() / safe_mean,
               *(v.float().to(t.device) for v in (s.dropped_by_capacity, s.requested_slots, s.gate_entropy_sum,
                                                  s.num_tokens, s.gating_dropped, s.a2a_bytes))]
        rows.append(torch.cat([torch.stack(row), t / (safe_mean * t.numel())]) if per_layer else torch.stack(row))
    flat = torch.cat(rows).tolist()  # the one host sync
    table, at = [], 0
    for r in rows:  # rows may differ in length (expert counts) when per_layer
        table.append(flat[at:at + r.numel()])
        at += r.numel()
    out = {"moe_layers": float(len(stats))}
    used = [row for row in table if row[0] > 0]
    if used:
        out["moe_load_cv"] = sum(row[1] for row in used) / len(used)
        out["moe_load_max_mean"] = sum(row[2] for row in used) / len(used)
    dropped, requested, entropy, tokens, gd, a2a = (sum(row[i] for row in table) for i in range(3, 9))
    out["moe_overflow"] = dropped / requested if requested else 0.0
    out["moe_gate_entropy"] = entropy / tokens if tokens else 0.0
    out["moe_gating_dropped"] = gd / len(stats)
    out["moe_a2a_bytes"] = a2a
    if per_layer:
        out["layers"] = [{"load_cv": row[1], "load_max_mean": row[2], "overflow": row[3] / row[4] if row[4] else 0.0,
                          "gating_dropped": row[7], "expert_load": row[9:]} for row in table]
    return out
