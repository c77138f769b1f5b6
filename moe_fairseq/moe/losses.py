"""Auxiliary losses of the routers, as pure functions of router outputs (unweighted)."""
import torch


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation over experts, population variance (Shazeer et al.'s
    reference code uses tf.nn.moments, i.e. the biased variance)."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    mean = x.mean()
    return ((x - mean) ** 2).mean() / (mean ** 2 + eps)


def switch_balance_loss(probs: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i P_i: f_i fraction of tokens whose argmax is i, P_i mean probability of i."""
    num_experts = probs.shape[1]
    f = torch.bincount(top1, minlength=num_experts).to(probs.dtype) / max(top1.numel(), 1)
    p = probs.mean(dim=0)
    return num_experts * torch.sum(f * p)


def gshard_balance_loss(probs: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    """E^2 * mean_i(me_i * ce_i): me mean gate probability, ce fraction of first choices."""
    num_experts = probs.shape[1]
    ce = torch.bincount(top1, minlength=num_experts).to(probs.dtype) / max(top1.numel(), 1)
    me = probs.mean(dim=0)
    return num_experts * num_experts * torch.mean(me * ce)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean_x (logsumexp_i logits_i)^2 (ST-MoE)."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
