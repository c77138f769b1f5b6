"""Every rank of an expert-parallel job must be given the same model flags; check it at start-up.

Each rank builds its MoE layers from its own command line.  If one rank gets another
--moe-expert-count, the ranks shard the experts differently and the first all-to-all fails
with a shape error or waits forever; another --moe-gating-dropout or --seed makes the ranks
take different Gating Dropout decisions (a pure function of seed, update and layer), so one
rank enters an all-to-all that the other skips: a hang.  Before the model is built, the ranks
all-gather the values of the flags that must agree (one small collective, once) and every rank
refuses a disagreement with one line naming the first such flag.

Checked: every MoE flag of the model and the task (derived from moe.config.MoEConfig and
models.moe_args.MoEModelOptions, aliases included) and AGREED_FAIRSEQ_FLAGS below.
"""
from typing import Dict, List, Tuple

import torch.distributed as dist

from ..moe.config import ALIASES, dest_flag, flag_dest
from ..moe.errors import MoEUsageError

# fairseq's own flags that decide the model's structure or the order of collectives
# (update_freq: forward passes, so all-to-alls, per update).
AGREED_FAIRSEQ_FLAGS = ("seed", "arch", "encoder_layers", "decoder_layers", "encoder_embed_dim",
                        "decoder_embed_dim", "encoder_ffn_embed_dim", "decoder_ffn_embed_dim", "update_freq",
                        "ddp_backend")


def agreed_flag_values(args) -> List[Tuple[str, str]]:
    """(flag, repr(value)) of every flag the ranks must agree on, in a fixed order."""
    from ..models.moe_args import flag_fields

    out = []
    for scope in ("model", "task"):
        for f in flag_fields(scope):
            out.append((f.metadata["flag"], repr(getattr(args, f.metadata["dest"], None))))
    for flag in ALIASES:
        out.append((flag, repr(getattr(args, flag_dest(flag), None))))
    for name in AGREED_FAIRSEQ_FLAGS:
        out.append((dest_flag(name), repr(getattr(args, name, None))))
    return out


def first_disagreement(per_rank: List[List[Tuple[str, str]]]):
    """(flag, {rank: value}) of the first flag whose value differs between ranks, else None."""
    tables: List[Dict[str, str]] = [dict(values) for values in per_rank]
    order = [flag for flag, _ in per_rank[0]]
    order += sorted({flag for table in tables for flag in table} - set(order))  # another moe_fairseq version
    for flag in order:
        values = {rank: table.get(flag, "(no such flag)") for rank, table in enumerate(tables)}
        if len(set(values.values())) > 1:
            return flag, values
    return None


def check_ranks_agree(args, group=None):
    """Refuse, on every rank, flags that differ between the ranks (see the module docstring).
    Does nothing without a process group of more than one rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        return
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, agreed_flag_values(args), group=group)
    found = first_disagreement(gathered)
    if found is not None:
        flag, values = found
        first = values[0]
        other = next(rank for rank, value in values.items() if value != first)
        raise MoEUsageError(f"ranks disagree on {flag}: rank 0 has {first}, rank {other} has {values[other]}; "
                            f"every rank must be given the same flags")
