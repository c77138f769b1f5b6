"""The MoE layer library: plain PyTorch, no fairseq needed.

The names below load on first use (PEP 562), so `moe_fairseq.moe.errors`, which the scripts that
only read logs and hypotheses import for MoEUsageError, does not pull in torch with the layers.
"""
import importlib

_SOURCES = {
    "AuxMode": "aux_mode",
    "MoEConfig": "config",
    "FFNExperts": "experts",
    "gating_dropout_fires": "gating_dropout",
    "KSchedule": "k_schedule",
    "MoEAux": "layer", "MoELayer": "layer", "build_moe_layer": "layer",
    "ROUTERS": "routers", "NoisyTopKRouter": "routers", "RandomRouter": "routers", "Router": "routers",
    "Routing": "routers", "Top1Router": "routers", "Top2Router": "routers",
}

__all__ = list(_SOURCES)


def __getattr__(name):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_SOURCES))
