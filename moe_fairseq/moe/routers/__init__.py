"""Routers by name: top1 (Switch), top2 (GShard), noisy_topk (Shazeer 2017), random (SMoE-Dropout).

Each router file registers itself (registry.register_router); importing it here is what makes a
built-in router available, in this order (the order of --moe-router's choices).
"""
from .base import Router, Routing
from .registry import ROUTERS, build_router, register_router
from .top1 import Top1Router
from .top2 import SECOND_EXPERT_POLICIES, Top2Router
from .noisy_topk import NoisyTopKRouter
from .random_router import RandomRouter

__all__ = ["Router", "Routing", "Top1Router", "Top2Router", "NoisyTopKRouter", "RandomRouter",
           "ROUTERS", "SECOND_EXPERT_POLICIES", "build_router", "register_router"]
