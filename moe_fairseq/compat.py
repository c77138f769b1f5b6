"""Fixes for running fairseq 0.12 on today's torch and on CPU-only machines, applied on import.

1. torch >= 2.6 loads checkpoints with weights_only=True; fairseq's torch.load calls pass no
   flag, so its own checkpoints (which hold an argparse.Namespace) fail to load.  Rather than
   switching the check off for every file, the few plain types fairseq stores are allowlisted.
2. Under torchrun on a machine without GPUs, fairseq computes `rank % torch.cuda.device_count()`
   (ZeroDivisionError), and with the default --distributed-world-size of 1 it ignores torchrun's
   environment so every process silently trains alone.  Here the world size, rank and device
   come from torchrun's environment, and gloo replaces nccl when there is no GPU.
3. fairseq's pytorch_ddp backend passes device_ids=[device_id] to DistributedDataParallel even
   for a CPU model, which torch rejects; CPU models get device_ids=None.
"""
import argparse
import logging
import os

import torch

logger = logging.getLogger(__name__)



def safe_checkpoint_globals():
    """Exactly what fairseq's checkpoints hold beyond tensors, containers and numbers: the
    training args (argparse.Namespace) and numpy arrays/scalars in the saved metrics (e.g.
    BLEU n-gram counts), as listed by torch.serialization.get_unsafe_globals_in_checkpoint."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)]
    return [argparse.Namespace, multiarray.multiarray._reconstruct, multiarray.multiarray.scalar,
            np.ndarray, np.dtype, *dtypes]


def allowlist_checkpoint_types():
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:  # torch < 2.4 has no weights_only default to satisfy
        add(safe_checkpoint_globals())


TORCHRUN_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")


def torchrun_world():
    """(world size, rank, local rank) when launched by torchrun / torch.distributed.launch."""
    if not all(key in os.environ for key in TORCHRUN_ENV):
        return None
    return int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))


def patch_fairseq_torchrun_detection():
    from fairseq.distributed import utils as distributed_utils

    original_infer = distributed_utils.infer_init_method
    if getattr(original_infer, "_moe_fairseq_patched", False):
        return

    def infer_init_method(cfg, force_distributed=False):
        world = torchrun_world()
        if world is None or cfg.distributed_init_method is not None:
            return original_infer(cfg, force_distributed)
        world_size, rank, local_rank = world
        cfg.distributed_world_size = world_size
        cfg.distributed_rank = rank
        cfg.distributed_init_method = "env://"
        cfg.distributed_no_spawn = True
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            cfg.device_id = local_rank % torch.cuda.device_count()
            torch.cuda.set_device(cfg.device_id)
        else:
            cfg.device_id = 0
            if cfg.distributed_backend == "nccl":
                logger.info("no GPU: using the gloo backend instead of nccl")
                cfg.distributed_backend = "gloo"

    infer_init_method._moe_fairseq_patched = True
    distributed_utils.infer_init_method = infer_init_method


def patch_cpu_ddp():
    from fairseq.models import distributed_fairseq_model

    base = distributed_fairseq_model.DistributedDataParallel
    if getattr(base, "_moe_fairseq_patched", False):
        return

    class DistributedDataParallel(base):
        _moe_fairseq_patched = True

        def __init__(self, module, device_ids=None, output_device=None, **kwargs):
            if all(p.device.type == "cpu" for p in module.parameters()):
                device_ids = output_device = None
            super().__init__(module, device_ids=device_ids, output_device=output_device, **kwargs)

    distributed_fairseq_model.DistributedDataParallel = DistributedDataParallel


allowlist_checkpoint_types()
patch_fairseq_torchrun_detection()
patch_cpu_ddp()
