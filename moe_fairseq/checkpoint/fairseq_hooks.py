"""Hooks into fairseq's checkpoint functions for expert-parallel training.

fairseq 0.12 saves one file from rank 0 and (by default) loads it on rank 0 and broadcasts it:
with experts sharded over ranks that would keep rank 0's experts only.  These wrappers:

- save: every rank writes its experts (and their optimizer state) into a shard directory named
  after (epoch, update); after a barrier rank 0 lets fairseq write its usual files with the
  shared parameters only and a pointer to that directory; shard directories that no checkpoint
  points to any more are deleted afterwards.  Every file is written atomically, and the pointer
  is written last, so a crash (even SIGKILL) never leaves a checkpoint with mixed shards.
- load: every rank reads the checkpoint and its own shard; if the checkpoint was written by a
  different world size (or is a consolidated single file) the experts are merged and re-sliced
  for this rank, optimizer state included.  A single process (fairseq-generate) gets every
  expert: a sharded checkpoint loads on one CPU or GPU as it is.
- every checkpoint of a MoE model also records the parameter name of each optimizer slot
  ("moe_param_names"), which is what makes optimizer state reshardable.
"""
import contextlib
import logging

import torch.distributed as dist
from fairseq import checkpoint_utils, utils
from fairseq.trainer import Trainer

from ..moe.collect import moe_layers
from ..moe.errors import MoEUsageError
from .format import PARAM_NAMES, POINTER, optimizer_param_names, point_to_shards, shard_meta, shard_path
from .sharded import atomic_save, remove_unreferenced_shards, resolve_experts, split_experts

logger = logging.getLogger(__name__)


def expert_parallel_comm(model):
    layers = moe_layers(model)
    if not layers or layers[0].comm.world_size == 1:
        return None
    return layers[0].comm


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


_original_save_checkpoint = checkpoint_utils.save_checkpoint
_original_load_checkpoint_to_cpu = checkpoint_utils.load_checkpoint_to_cpu
_original_trainer_load_checkpoint = Trainer.load_checkpoint


def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
    if not moe_layers(trainer._model):
        return _original_save_checkpoint(cfg, trainer, epoch_itr, val_loss)
    names = optimizer_param_names(trainer._model, trainer._criterion)
    comm = expert_parallel_comm(trainer._model)
    if comm is None or cfg.no_save:
        with _post_process_state(trainer, lambda s: s.__setitem__(PARAM_NAMES, names)):
            return _original_save_checkpoint(cfg, trainer, epoch_itr, val_loss)
    if getattr(trainer.optimizer, "has_flat_params", False):
        raise MoEUsageError("expert-parallel checkpoints need per-parameter optimizer state: use "
                            "--memory-efficient-fp16 (or --fp16-no-flatten-grads) instead of plain --fp16")
    rank, world = dist.get_rank(comm.group), dist.get_world_size(comm.group)
    tag = f"e{epoch_itr.epoch}-u{trainer.get_num_updates()}"
    trainer.consolidate_optimizer()  # fairseq's state_dict() expects it (it sets the optimizer hand-off)
    shard = split_experts(utils.move_to_cpu(trainer.state_dict()), names)
    shard["meta"] = shard_meta(rank, world, tag, trainer.get_num_updates())
    atomic_save(shard, shard_path(cfg.save_dir, tag, rank, world))
    dist.barrier(group=comm.group)  # every shard is on disk before anything points to them

    def strip_and_point(state):
        split_experts(state, names)  # rank 0's experts are in its shard
        point_to_shards(state, tag, world, names)

    with _post_process_state(trainer, strip_and_point):
        result = _original_save_checkpoint(cfg, trainer, epoch_itr, val_loss)
    if rank == 0:
        remove_unreferenced_shards(cfg.save_dir, tag)
    return result


def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
    state = _original_load_checkpoint_to_cpu(path, arg_overrides, load_on_all_ranks)
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
    return _original_trainer_load_checkpoint(self, filename, *args, **kwargs)


def install():
    checkpoint_utils.save_checkpoint = save_checkpoint
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    Trainer.load_checkpoint = trainer_load_checkpoint
