"""Generation with expert parallelism on several ranks (e.g. fairseq's --eval-bleu).

Each rank decodes its own batch, so ranks run different numbers of decoder steps; but every
call of an expert-parallel MoE decoder layer is a collective (a count exchange and two row
all-to-alls).  Left alone, a rank that has finished moves on to its next collective while
another still decodes: the collectives pair up wrongly and the job hangs until the collective
timeout.  fairseq's MoE branch has the same problem with validation BLEU.

`generate_in_step` keeps the ranks in step: after its own generation a rank clears its
communicators' `active` flag and calls the decoder's MoE layers on no tokens, step after step,
so that it still receives, computes and returns the rows the other ranks route to its experts.
The flag travels with every count exchange, so after the first layer of each served step every
rank knows whether any rank is still generating; all ranks read the same flags from the same
exchange, so the last one to finish and the waiting ones leave together.
"""
from typing import Callable, Sequence, TypeVar

import torch

from .layer import MoELayer

T = TypeVar("T")


def generate_in_step(generate: Callable[[], T], decoder_layers: Sequence[MoELayer]) -> T:
    """Run generate() (one rank's generation), then serve the other ranks' decoder steps until
    every rank is done.  decoder_layers: the decoder's MoE layers in the order one decoder step
    calls them.  A no-op wrapper when the layers are not expert-parallel."""
    comms = []
    for layer in decoder_layers:
        if layer.comm.world_size > 1 and all(layer.comm is not c for c in comms):
            comms.append(layer.comm)
    if not comms:
        return generate()
    result = generate()
    for comm in comms:
        comm.active = False
    try:
        first = decoder_layers[0]
        dim = first.experts.model_dim
        param = first.experts.b1  # fp32 or int8 experts alike: the dtype and device of the activations
        nothing = torch.empty(0, dim, dtype=param.dtype, device=param.device)
        with torch.no_grad():
            while True:
                first(nothing)
                if not first.comm.peers_active:  # every rank said done in this exchange
                    break
                for layer in decoder_layers[1:]:
                    layer(nothing)
    finally:
        for comm in comms:
            comm.active = True
    return result
