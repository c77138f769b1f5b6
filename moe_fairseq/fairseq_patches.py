"""Every change moe_fairseq makes to fairseq (and to other global state), installed by one
idempotent `install()` for fairseq 0.12.2 / fairseq-fixed 0.12.3.1 only.

Importing moe_fairseq, or its layer library moe_fairseq.moe, changes nothing: install() runs
when moe_fairseq.plugin is imported, which is what `--user-dir moe_fairseq` does and what a
program that builds this plugin's model in-process needs (moe-prune's usage count).  The
offline tools that only read and write checkpoint files (moe-consolidate, moe-reshard,
moe-average, moe-evaluate's reading of the saved arguments) install nothing: reading needs
only the type allowlist of checkpoint/io.py.  The patches, and why each exists:

1. torch.serialization safe globals.  torch >= 2.6 loads checkpoints with weights_only=True;
   fairseq's torch.load calls pass no flag, so its own checkpoints (which hold an
   argparse.Namespace) fail to load.  Rather than switching the check off for every file, the
   few plain types fairseq stores are allowlisted (checkpoint/io.py's allow_checkpoint_types,
   which the offline tools call themselves).
2. fairseq.distributed.utils.infer_init_method.  Under torchrun on a machine without GPUs,
   fairseq computes `rank % torch.cuda.device_count()` (ZeroDivisionError), and with the default
   --distributed-world-size of 1 it ignores torchrun's environment so every process silently
   trains alone.  Here the world size, rank and device come from torchrun's environment, and
   gloo replaces nccl when there is no GPU.
3. fairseq.models.distributed_fairseq_model.DistributedDataParallel.  fairseq's pytorch_ddp
   backend passes device_ids=[device_id] even for a CPU model, which torch rejects; CPU models
   get device_ids=None.
4. FairseqOptimizer.all_reduce_grads.  With expert parallelism, fairseq's data-parallel
   reduction must not average expert weights that differ on every rank (the task puts them on
   DDP's ignore list, see distributed/expert_parallel_training.py); after fairseq's reduction,
   expert gradients are summed over the replicas of the same expert (fairseq issue #4220) and
   divided by W, the scale fairseq's trainer expects (moe.expert_parallel.all_reduce_expert_grads).
5. checkpoint_utils.save_checkpoint.  fairseq saves one file from rank 0, which with sharded
   experts would keep rank 0's experts only.  Every rank writes its experts (and their optimizer
   state) into a shard set, after a barrier rank 0 lets fairseq write its usual files with the
   shared parameters and a pointer to that set (checkpoint/format.py), and shard sets no file
   points to any more are deleted.  Every file is written atomically and the pointer last, so a
   crash (even SIGKILL) never leaves a checkpoint with mixed shards.  The pointer records the
   job's run id (drawn by rank 0, broadcast once) and the shards' tensor shapes, so that a
   reader refuses a foreign or damaged shard in one line (checkpoint/format.py).  Every
   checkpoint of a MoE model also records the parameter name of each optimizer slot
   (resharding needs them).
6. checkpoint_utils.load_checkpoint_to_cpu.  Every rank reads the checkpoint and its own shard;
   a checkpoint written by another world size (or a consolidated single file) is merged and
   re-sliced for this rank, optimizer state included.  A single process (fairseq-generate) gets
   every expert, so a sharded checkpoint loads on one CPU or GPU as it is.
7. Trainer.load_checkpoint.  fairseq loads on rank 0 and broadcasts by default; with expert
   parallelism every rank must read its own shard (load_checkpoint_on_all_dp_ranks).
8. sys.excepthook.  fairseq's command lines let exceptions from model/task construction escape
   with a full traceback; a MoEUsageError (a bad flag or file) is printed as one line
   (cli_errors.py).
9. fairseq.utils.clip_grad_norm_.  The gradient norm fairseq computes, and checks for an fp16
   overflow (--fp16, --memory-efficient-fp16, --amp) and for agreement between ranks, leaves
   out every parameter marked `expert`: an overflow in expert gradients alone went unnoticed
   and the step wrote inf/nan into the experts.  The norm is made inf when any expert gradient
   is not finite, on every rank alike (one MAX all-reduce of a flag: ranks hold different
   experts, and fairseq stops when ranks report different norms); fairseq then skips the step.
10. checkpoint_utils.torch_persistent_save and checkpoint_utils.PathManager.copy.  fairseq
   retries a failed torch.save on the same, partly written file handle (a torn file is then
   renamed into place), leaves <file>.tmp behind, and copies checkpoint_last.pt (_best, ...)
   over the old file with shutil.copyfile: a full disk during the copy destroyed the previous
   checkpoint_last.pt.  Local files are now written and copied atomically (temporary file,
   fsync, rename; the temporary removed on failure), and after a completed save the
   temporaries of interrupted ones (SIGKILL) are deleted.
11. fairseq.distributed.utils.distributed_init.  fairseq creates the process group with
   torch's default timeout (30 min gloo, 10 min NCCL), so when a rank hangs (or dies where no
   launcher notices: another machine) its peers wait that long inside a collective;
   --collective-timeout (task translation_multi_moe) sets the process group's timeout.
12. FP16Optimizer.build_optimizer.  Plain --fp16 flattens every parameter into one fp32 master
   tensor, which carries no `expert` mark: the gradient norm then includes this rank's own
   expert gradients, differs between ranks, and fairseq's check of the ranks' norms (run on
   CUDA only) stops the first update with "gradients are inconsistent between workers"; the
   overflow check of expert gradients (9) cannot see them either.  With expert parallelism the
   master copy is kept per parameter (fairseq's own --fp16-no-flatten-grads), which keeps the
   mark: the same arithmetic, one copy kernel per parameter instead of one.
13. AMPOptimizer.step.  torch's loss scaler decides on each rank whether the gradients
   overflowed; expert gradients differ between ranks, so one rank could skip a step (and halve
   its scale) while the others step, and the shared weights would drift apart.  The overflow
   flags are MAX-all-reduced before the step and the scale update, as Megatron and DeepSpeed do.
14. fairseq.distributed.utils.call_main.  fairseq 0.12 turns every --bf16 into --tpu (its
   options.py), so a GPU or CPU run died importing torch_xla.  Unless --tpu was given, --bf16
   now trains in bfloat16 on the device at hand (fairseq's FP16Optimizer keeps an fp32 master
   copy; bf16 needs no loss scaling).
15. fairseq.distributed.utils._broadcast_object_slow.  Resuming a data-parallel job (no expert
   parallelism: fairseq's own models, or MoE experts replicated), rank 0 reads the checkpoint
   and broadcasts it; the other ranks unpickle it with torch.load, which under torch >= 2.6
   refuses the DictConfig fairseq has put into the state (omegaconf's internals, far more types
   than the file itself holds: patch 1 is not enough), so every rank but 0 died at the resume.
   The bytes are this job's own, pickled by rank 0 a moment before and sent over its process
   group, not a file from anywhere: the receiving ranks load them with weights_only=False.
"""
import contextlib
import datetime
import functools
import logging
import os

import torch
import torch.distributed as dist

from .atomic_files import atomic_copy
from .checkpoint.io import allow_checkpoint_types
from .checkpoint.format import (PARAM_NAMES, POINTER, new_run_id, optimizer_param_names, point_to_shards, shard_meta,
                                shard_path, shard_tag, tensor_shapes)
from .checkpoint.sharded import (atomic_save, remove_stale_temporaries, remove_unreferenced_shards, resolve_experts,
                                 split_experts)
from .cli_errors import install_excepthook
from .moe.collect import expert_parallel_comm, moe_layers
from .moe.errors import MoEUsageError
from .moe.expert_parallel import all_reduce_expert_grads

logger = logging.getLogger(__name__)

# fairseq-fixed is a build of 0.12.2 that imports on Python 3.11+; it reports its own version.
SUPPORTED_FAIRSEQ_VERSIONS = ("0.12.2", "0.12.3.1")

# fairseq itself is imported in install(), after install_excepthook and before the version check,
# so that an unsupported fairseq gets the one-line error, not an ImportError from one of its modules.
_installed = False
_original = {}  # what each patch replaced, by name: the patched functions call through to these


def check_fairseq_version(version: str):
    if version not in SUPPORTED_FAIRSEQ_VERSIONS:
        raise MoEUsageError(f"moe_fairseq patches fairseq {' or '.join(SUPPORTED_FAIRSEQ_VERSIONS)}, not fairseq "
                            f"{version}: install fairseq==0.12.2 (Python < 3.11) or fairseq-fixed==0.12.3.1")


def install():
    """Install every patch of the module docstring, once (later calls do nothing)."""
    global _installed
    if _installed:
        return
    install_excepthook()  # first, so that the version error below is printed as one line
    import fairseq

    check_fairseq_version(fairseq.__version__)
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils
    from fairseq.models import distributed_fairseq_model
    from fairseq.optim.amp_optimizer import AMPOptimizer
    from fairseq.optim.fairseq_optimizer import FairseqOptimizer
    from fairseq.optim.fp16_optimizer import FP16Optimizer
    from fairseq.trainer import Trainer
    from fairseq import utils as fairseq_utils

    allow_checkpoint_types()
    _original.update(infer_init_method=distributed_utils.infer_init_method,
                     all_reduce_grads=FairseqOptimizer.all_reduce_grads,
                     save_checkpoint=checkpoint_utils.save_checkpoint,
                     load_checkpoint_to_cpu=checkpoint_utils.load_checkpoint_to_cpu,
                     trainer_load_checkpoint=Trainer.load_checkpoint,
                     clip_grad_norm_=fairseq_utils.clip_grad_norm_,
                     torch_persistent_save=checkpoint_utils.torch_persistent_save,
                     distributed_init=distributed_utils.distributed_init,
                     fp16_build_optimizer=FP16Optimizer.__dict__["build_optimizer"].__func__,
                     amp_step=AMPOptimizer.step, call_main=distributed_utils.call_main,
                     broadcast_object_slow=distributed_utils._broadcast_object_slow)
    distributed_utils.infer_init_method = infer_init_method
    base_ddp = distributed_fairseq_model.DistributedDataParallel
    distributed_fairseq_model.DistributedDataParallel = _cpu_ddp_class(base_ddp)
    FairseqOptimizer.all_reduce_grads = all_reduce_grads
    checkpoint_utils.save_checkpoint = save_checkpoint
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    Trainer.load_checkpoint = trainer_load_checkpoint
    fairseq_utils.clip_grad_norm_ = clip_grad_norm_
    checkpoint_utils.torch_persistent_save = torch_persistent_save
    checkpoint_utils.PathManager = _AtomicCopyPathManager(checkpoint_utils.PathManager)
    distributed_utils.distributed_init = distributed_init
    FP16Optimizer.build_optimizer = classmethod(fp16_build_optimizer)
    AMPOptimizer.step = amp_step
    distributed_utils.call_main = call_main
    distributed_utils._broadcast_object_slow = broadcast_object_slow
    _installed = True


# ------------------------------------------------------------------ 2. torchrun on CPU
TORCHRUN_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")


def torchrun_world():
    """(world size, rank, local rank) when launched by torchrun / torch.distributed.launch."""
    if not all(key in os.environ for key in TORCHRUN_ENV):
        return None
    return int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))


def infer_init_method(cfg, force_distributed=False):
    world = torchrun_world()
    if world is None or cfg.distributed_init_method is not None:
        return _original["infer_init_method"](cfg, force_distributed)
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


# ------------------------------------------------------------------ 3. DDP of a CPU model
def _cpu_ddp_class(base):
    class DistributedDataParallel(base):
        def __init__(self, module, device_ids=None, output_device=None, **kwargs):
            if all(p.device.type == "cpu" for p in module.parameters()):
                device_ids = output_device = None
            super().__init__(module, device_ids=device_ids, output_device=output_device, **kwargs)

    return DistributedDataParallel


# ------------------------------------------------------------------ 4. expert gradients
def all_reduce_grads(self, module):
    _original["all_reduce_grads"](self, module)
    comm = expert_parallel_comm(module)
    if comm is not None:
        all_reduce_expert_grads(module, comm)


# ------------------------------------------------------------------ 5-7. sharded checkpoints
@contextlib.contextmanager
def _post_process_state(trainer, fn):
    original = trainer.state_dict

    def state_dict():
        state = original()
        fn(state)
        return state

    trainer.state_dict = state_dict
    try:
        yield
    finally:
        del trainer.state_dict


def _run_id(trainer, comm) -> str:
    """An id of this job, drawn by rank 0 at its first save and shared with every rank (one
    broadcast, once): it marks the job's shards so that a reader can tell them from another
    job's shards under the same tag (format.py)."""
    run = getattr(trainer, "_moe_run_id", None)
    if run is None:
        box = [new_run_id()]
        group = comm.group
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast_object_list(box, src=src, group=group)
        run = trainer._moe_run_id = box[0]
    return run


def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
    original = _original["save_checkpoint"]
    if not moe_layers(trainer._model):
        return original(cfg, trainer, epoch_itr, val_loss)
    names = optimizer_param_names(trainer._model, trainer._criterion)
    comm = expert_parallel_comm(trainer._model)
    if comm is None or cfg.no_save:
        with _post_process_state(trainer, lambda s: s.__setitem__(PARAM_NAMES, names)):
            result = original(cfg, trainer, epoch_itr, val_loss)
        if not cfg.no_save and trainer.should_save_checkpoint_on_current_rank:
            remove_stale_temporaries(cfg.save_dir)
        return result
    if getattr(trainer.optimizer, "has_flat_params", False):
        raise MoEUsageError("expert-parallel checkpoints need per-parameter optimizer state: use "
                            "--memory-efficient-fp16 (or --fp16-no-flatten-grads) instead of plain --fp16")
    rank, world = dist.get_rank(comm.group), dist.get_world_size(comm.group)
    tag = shard_tag(epoch_itr.epoch, trainer.get_num_updates())
    run = _run_id(trainer, comm)
    trainer.consolidate_optimizer()  # fairseq's state_dict() expects it (it sets the optimizer hand-off)
    from fairseq import utils

    shard = split_experts(utils.move_to_cpu(trainer.state_dict()), names)
    shard["meta"] = shard_meta(rank, world, tag, trainer.get_num_updates(), run)
    shapes = tensor_shapes(shard["model"])  # the same on every rank (each holds L experts)
    atomic_save(shard, shard_path(cfg.save_dir, tag, rank, world))
    dist.barrier(group=comm.group)  # every shard is on disk before anything points to them

    def strip_and_point(state):
        split_experts(state, names)  # rank 0's experts are in its shard
        point_to_shards(state, tag, world, names, run=run, shapes=shapes)

    with _post_process_state(trainer, strip_and_point):
        result = original(cfg, trainer, epoch_itr, val_loss)
    if rank == 0:
        # Only after a save that completed: a failed one leaves the previous set referenced.
        remove_unreferenced_shards(cfg.save_dir, tag)
        remove_stale_temporaries(cfg.save_dir)
    return result


def torch_persistent_save(obj, filename, async_write=False):
    # fairseq writes <file>.tmp and renames it, but on an error it retries torch.save twice on
    # the same, already partly written handle (a file with a torn prefix is then renamed into
    # place) and leaves <file>.tmp behind; no fsync either.  A local file is written by
    # atomic_save instead: one attempt, fsync, rename, the temporary removed on failure.
    if async_write or "://" in str(filename):
        return _original["torch_persistent_save"](obj, filename, async_write)
    atomic_save(obj, filename)


class _AtomicCopyPathManager:
    """fairseq's PathManager as checkpoint_utils sees it, with an atomic copy of local files:
    save_checkpoint copies its first file to checkpoint_last.pt (and _best, ...) with
    PathManager.copy, i.e. shutil.copyfile over the old file, so a full disk during the copy
    left a truncated checkpoint_last.pt: neither the old checkpoint nor the new one."""

    def __init__(self, base):
        self._base = base

    def __getattr__(self, name):
        return getattr(self._base, name)

    def copy(self, src_path, dst_path, overwrite=False):
        if "://" in str(src_path) or "://" in str(dst_path) or (not overwrite and os.path.exists(dst_path)):
            return self._base.copy(src_path, dst_path, overwrite)
        atomic_copy(src_path, dst_path)
        return True


def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
    state = _original["load_checkpoint_to_cpu"](path, arg_overrides, load_on_all_ranks)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if POINTER in state or world > 1:
        state = resolve_experts(state, path, rank, world)
    return state


def trainer_load_checkpoint(self, filename, *args, **kwargs):
    # Each rank must read its own shard: never let rank 0 read for everyone and broadcast.
    if expert_parallel_comm(self._model) is not None and not self.cfg.checkpoint.load_checkpoint_on_all_dp_ranks:
        from omegaconf import open_dict

        with open_dict(self.cfg):
            self.cfg.checkpoint.load_checkpoint_on_all_dp_ranks = True
    return _original["trainer_load_checkpoint"](self, filename, *args, **kwargs)


# ------------------------------------------------------------------ 9. overflow in expert gradients
def clip_grad_norm_(params, max_norm, aggregate_norm_fn=None):
    params = [params] if torch.is_tensor(params) else list(params)
    total = _original["clip_grad_norm_"](params, max_norm, aggregate_norm_fn)
    expert = [p.grad for p in params if getattr(p, "grad", None) is not None and hasattr(p, "expert")]
    if not expert:
        return total
    bad = torch.stack([~torch.isfinite(g).all() for g in expert]).any().float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank with experts calls this, in step
    return total + float("inf") if bad > 0 else total


# ------------------------------------------------------------------ 11. collective timeout
def collective_timeout(cfg):
    """--collective-timeout (task translation_multi_moe) in seconds, or None (torch's default)."""
    task = getattr(cfg, "task", None)
    value = getattr(task, "collective_timeout", None) if task is not None else getattr(cfg, "collective_timeout", None)
    return value if value and value > 0 else None


def distributed_init(cfg):
    # fairseq creates the process group with torch's default timeout (30 min for gloo, 10 for
    # NCCL), so a rank whose peer hangs (a stopped process, a frozen or unreachable host) waits
    # that long inside a collective.  torchrun ends a job on its own machine when a worker
    # *exits*, but not when one hangs, nor the workers on other machines (static rendezvous).
    # The timeout is set once the group exists, so that it bounds collectives only: the
    # rendezvous keeps torch's default (ranks may start seconds apart).
    seconds = collective_timeout(cfg)
    if seconds is None or dist.is_initialized():
        return _original["distributed_init"](cfg)
    timeout = datetime.timedelta(seconds=seconds)
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)  # torch >= 2.2
    if set_timeout is not None:
        result = _original["distributed_init"](cfg)
        set_timeout(timeout)
    else:  # older torch: the timeout of the whole group, rendezvous included
        init = dist.init_process_group
        dist.init_process_group = functools.partial(init, timeout=timeout)
        try:  # only for fairseq's one call; the rest of the program sees torch's own function
            result = _original["distributed_init"](cfg)
        finally:
            dist.init_process_group = init
    logger.info(f"collective timeout: {seconds:g} s (--collective-timeout)")
    return result


# ------------------------------------------------------------------ 12-14. precision with several ranks
def _several_ranks() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def fp16_build_optimizer(cls, cfg, params, **kwargs):
    params = list(params)
    flat = not getattr(cfg.common, "fp16_no_flatten_grads", False) and not getattr(cfg.common, "bf16", False)
    if flat and _several_ranks() and any(hasattr(p, "expert") for p in params):
        from omegaconf import open_dict

        logger.info("expert parallelism: --fp16 keeps its fp32 master copy per parameter "
                    "(--fp16-no-flatten-grads), so that expert gradients stay out of the gradient norm "
                    "the ranks compare")
        with open_dict(cfg):
            cfg.common.fp16_no_flatten_grads = True
    return _original["fp16_build_optimizer"](cls, cfg, params, **kwargs)


def agree_on_overflow(scaler, optimizer, group=None):
    """Make every rank's loss-scaler overflow decision the same (MAX over ranks) before
    scaler.step(optimizer) and scaler.update() read it; no host sync (the flags stay on the
    device).  Unscales `optimizer` first where step would have (fairseq's AMPOptimizer steps its
    wrapper, whose gradients scaler.step would otherwise unscale after this point)."""
    if not scaler.is_enabled():
        return
    from torch.amp.grad_scaler import OptState

    states = scaler._per_optimizer_states
    if states[id(optimizer)]["stage"] is OptState.READY:
        scaler.unscale_(optimizer)
    flags = [f for state in states.values() for f in state["found_inf_per_device"].values()]
    if not flags:
        return
    found = torch.stack([f.reshape(()).float() for f in flags]).amax()
    dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
    for f in flags:
        f.copy_(found.reshape(f.shape).to(f.dtype))


def amp_step(self):
    if _several_ranks() and any(hasattr(p, "expert") for p in self.fp32_optimizer.params):
        agree_on_overflow(self.scaler, self.fp32_optimizer)
    return _original["amp_step"](self)


def call_main(cfg, main, **kwargs):
    import sys

    if getattr(cfg.common, "bf16", False) and getattr(cfg.common, "tpu", False) and "--tpu" not in sys.argv:
        from omegaconf import open_dict

        # fairseq's options.py set --tpu for --bf16; a run that did not ask for a TPU trains
        # in bfloat16 where it is (check_precision_flags has refused it where that cannot work).
        for section in (cfg.common, cfg.distributed_training, getattr(cfg, "optimizer", None)):
            if section is not None and getattr(section, "tpu", False):
                with open_dict(section):
                    section.tpu = False
    return _original["call_main"](cfg, main, **kwargs)


# ------------------------------------------------------------------ 15. a state broadcast to the other ranks
def broadcast_object_slow(obj, src_rank, group, dist_device):
    """fairseq's _broadcast_object_slow (distributed/utils.py), with the receiving ranks'
    torch.load told that the bytes are trusted: they are what rank `src_rank` of this job
    torch.saved, not a file."""
    import io

    from fairseq.distributed.utils import broadcast, get_rank

    if get_rank(group) == src_rank:
        return _original["broadcast_object_slow"](obj, src_rank, group, dist_device)
    length = torch.LongTensor([0]).to(dist_device)
    broadcast(length, src=src_rank, group=group)
    buffer = torch.ByteTensor(int(length.item())).to(dist_device)
    broadcast(buffer, src=src_rank, group=group)
    return torch.load(io.BytesIO(buffer.cpu().numpy()), map_location="cpu", weights_only=False)
