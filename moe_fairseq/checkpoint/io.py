"""Reading a checkpoint file given on a command line, with one-line errors naming it."""
import os

import torch

from ..moe.errors import MoEUsageError


def read_checkpoint(path: str, label: str = "checkpoint") -> dict:
    """The fairseq state in `path` (torch.load's default weights_only check: moe_fairseq
    allowlists what fairseq checkpoints hold); `label` names the flag or argument in errors."""
    if not os.path.isfile(path):
        raise MoEUsageError(f"{label} {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu")
    except Exception as e:  # truncated, or not a torch file; torch's own message spans many lines
        raise MoEUsageError(f"{label} {path} cannot be read as a checkpoint "
                            f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise MoEUsageError(f"{label} {path} is not a fairseq checkpoint")
    return state
