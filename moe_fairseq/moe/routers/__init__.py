"""Routers by name: top1 (Switch), top2 (GShard), noisy_topk (Shazeer 2017), random (SMoE-Dropout)."""
from .base import Router, Routing
from .noisy_topk import NoisyTopKRouter
from .random_router import RandomRouter
from .top1 import Top1Router
from .top2 import SECOND_EXPERT_POLICIES, Top2Router

ROUTERS = ("top1", "top2", "noisy_topk", "random")

__all__ = ["Router", "Routing", "Top1Router", "Top2Router", "NoisyTopKRouter", "RandomRouter",
           "ROUTERS", "SECOND_EXPERT_POLICIES"]
