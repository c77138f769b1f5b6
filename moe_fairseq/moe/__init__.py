"""The MoE layer library: plain PyTorch, no fairseq needed."""
from .config import MoEConfig
from .experts import FFNExperts
from .gating_dropout import gating_dropout_fires
from .k_schedule import KSchedule
from .layer import MoEAux, MoELayer, build_moe_layer
from .routers import ROUTERS, NoisyTopKRouter, RandomRouter, Router, Routing, Top1Router, Top2Router

__all__ = ["MoEConfig", "FFNExperts", "gating_dropout_fires", "KSchedule", "MoEAux", "MoELayer",
           "build_moe_layer", "ROUTERS", "NoisyTopKRouter", "RandomRouter", "Router", "Routing",
           "Top1Router", "Top2Router"]
