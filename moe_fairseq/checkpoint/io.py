"""Reading a checkpoint file given on a command line, with one-line errors naming it."""
import argparse
import os

import torch

from ..moe.errors import MoEUsageError


def safe_checkpoint_globals():
    """Exactly what fairseq's checkpoints hold beyond tensors, containers and numbers: the
    training args (argparse.Namespace) and numpy arrays/scalars in the saved metrics (e.g.
    BLEU n-gram counts), as listed by torch.serialization.get_unsafe_globals_in_checkpoint."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)]
    return [argparse.Namespace, multiarray.multiarray._reconstruct, multiarray.multiarray.scalar,
            np.ndarray, np.dtype, *dtypes]


def allow_checkpoint_types():
    """Allowlist those types for torch.load's default weights_only check (idempotent)."""
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch < 2.4 has no weights_only default to satisfy
        add_safe_globals(safe_checkpoint_globals())


def read_checkpoint(path: str, label: str = "checkpoint") -> dict:
    """The fairseq state in `path` (torch.load's default weights_only check, with what fairseq
    checkpoints hold allowlisted here: the library functions work without the plugin's patches
    installed); `label` names the flag or argument in errors."""
    allow_checkpoint_types()
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
