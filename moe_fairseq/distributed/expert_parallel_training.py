"""Make fairseq's data-parallel training correct for expert-parallel MoE models.

With W > 1 ranks every MoE layer shards its experts (moe.expert_parallel).  fairseq's
data-parallel machinery would then average expert weights that are *different* on every rank;
the task keeps them out of it here, and fairseq_patches.py (patch 4) reduces their gradients
the right way:

- pytorch_ddp / c10d: the expert parameters are put on DDP's ignore list (so they are neither
  broadcast from rank 0 at start nor averaged after backward);
- legacy_ddp / no_c10d: fairseq already skips parameters marked `expert`;
- any other backend (fully_sharded, slowmo) is refused with a one-line error.
"""
from ..moe.collect import expert_parallel_comm
from ..moe.errors import MoEUsageError

SUPPORTED_DDP_BACKENDS = ("pytorch_ddp", "c10d", "legacy_ddp", "no_c10d")


def prepare_expert_parallel(model, args):
    comm = expert_parallel_comm(model)
    if comm is None:
        return
    backend = getattr(args, "ddp_backend", "pytorch_ddp")
    if backend not in SUPPORTED_DDP_BACKENDS:
        raise MoEUsageError(f"--ddp-backend {backend} cannot train expert-parallel MoE models; use one of "
                            f"{', '.join(SUPPORTED_DDP_BACKENDS)}")
    # torch's DistributedDataParallel reads this attribute of the wrapped module.
    model._ddp_params_and_buffers_to_ignore = [n for n, p in model.named_parameters() if getattr(p, "expert", False)]
