"""Auxiliary losses of the routers, as pure functions of router outputs (unweighted)."""
import torch

from .counting import histogram


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half / bfloat16 / integer inputs to fp32, but keep fp64 (tests, gradcheck) as is."""
    if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point():
        return x.float()
    return x


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation over experts, population variance (Shazeer et al.'s
    reference code uses tf.nn.moments, i.e. the biased variance)."""
    x = _at_least_fp32(x)
    if x.numel() <= 1:
        return x.new_zeros(())
    mean = x.mean()
    return ((x - mean) ** 2).mean() / (mean ** 2 + eps)


def switch_balance_loss(probs: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i P_i: f_i fraction of tokens whose argmax is i, P_i mean probability of i."""
    num_experts = probs.shape[1]
    num_tokens = max(top1.numel(), 1)  # no tokens (all padding): loss 0, not 0/0 = nan
    f = histogram(top1, num_experts).to(probs.dtype) / num_tokens
    p = probs.sum(dim=0) / num_tokens
    return num_experts * torch.sum(f * p)


def gshard_balance_loss(probs: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    """E^2 * mean_i(me_i * ce_i): me mean gate probability, ce fraction of first choices."""
    num_experts = probs.shape[1]
    num_tokens = max(top1.numel(), 1)
    ce = histogram(top1, num_experts).to(probs.dtype) / num_tokens
    me = probs.sum(dim=0) / num_tokens
    return num_experts * num_experts * torch.mean(me * ce)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean_x (logsumexp_i logits_i)^2 (ST-MoE)."""
    z = torch.logsumexp(_at_least_fp32(logits), dim=-1).pow(2)
    return z.sum() / max(z.numel(), 1)
