"""Collect what the MoE layers of a model left after a forward pass (losses, statistics)."""
import contextlib
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from .aux_mode import AuxMode
from .layer import MoEAux, MoELayer
from .stats import RoutingStats


def moe_layers(model: nn.Module) -> List[MoELayer]:
    """The MoE layers of `model`, found once and cached on it (module trees do not change)."""
    cached = getattr(model, "_moe_layers_cache", None)
    if cached is None:
        cached = [m for m in model.modules() if isinstance(m, MoELayer)]
        object.__setattr__(model, "_moe_layers_cache", cached)
    return cached


def expert_parallel_comm(model: nn.Module):
    """The communicator of the model's MoE layers when they are expert-parallel (W > 1), else None."""
    layers = moe_layers(model)
    if not layers or layers[0].comm.world_size == 1:
        return None
    return layers[0].comm


def pop_aux(model: nn.Module) -> Tuple[List[Dict[str, torch.Tensor]], List[RoutingStats]]:
    """Losses and statistics of the last forward of every MoE layer; clears them so a layer that
    did not run in the next forward is not counted twice."""
    losses, stats = [], []
    for layer in moe_layers(model):
        aux = layer.aux
        if aux.losses or aux.stats is not None:
            losses.append(aux.losses)
            if aux.stats is not None:
                stats.append(aux.stats)
        layer.aux = MoEAux()
    return losses, stats


@contextlib.contextmanager
def computing_aux(model: nn.Module, aux_mode: AuxMode = AuxMode.ALL):
    """Within this block the model's MoE layers compute what `aux_mode` says (MoELayer.aux_mode),
    in evaluation too: the criterion asks for losses and statistics around its forward so that
    validation logs them; outside it, evaluation (generation) computes neither."""
    mode, layers = AuxMode.of(aux_mode), moe_layers(model)
    before = [layer.aux_mode for layer in layers]
    for layer in layers:
        layer.aux_mode = mode
    try:
        yield
    finally:
        for layer, value in zip(layers, before):
            layer.aux_mode = value
