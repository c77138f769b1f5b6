"""moe-reshard: rewrite a MoE checkpoint for continued training on another world size.

    moe-reshard save_dir/checkpoint_last.pt new_save_dir --world-size 4

Writes new_save_dir/checkpoint_last.pt (shared parameters + a pointer) and one expert shard per
rank, optimizer state included (fairseq's NLLB branch drops it); then train with
`--save-dir new_save_dir` on that many ranks.  Training also reshards on the fly when it loads
a checkpoint written by another world size; this command makes the layout explicit and lets
the new run start from a directory of its own.  Damaged or missing input shards are refused
in one line naming the file, before anything is written; a write that fails (a full disk)
removes what was written, so there is never a partial output.
"""
import argparse
import os
import shutil
import sys

from ..checkpoint.format import (SHARD_ROOT, new_run_id, param_names_of, point_to_shards, read_pointer,
                                 reshard_tag, shard_meta, shard_path, tensor_shapes)
from ..checkpoint.io import read_checkpoint
from ..checkpoint.saved_args import saved_args
from ..checkpoint.sharded import atomic_save, remove_unreferenced_shards, resolve_experts, slice_shard, split_experts
from ..moe.errors import MoEUsageError
from ..moe.expert_parallel import expert_sharding
from ..checkpoint.format import refuse_int8


def reshard(src: str, out_dir: str, world_size: int, name: str = "checkpoint_last.pt"):
    """Every input is read and checked (resolve_experts) before anything is written; if a write
    fails, what this call wrote is removed again, so a failure leaves no partial output."""
    state = read_checkpoint(src)
    refuse_int8(state, src, "moe-reshard")
    num_experts = saved_args(state).num_experts
    if not num_experts:
        raise MoEUsageError(f"{src} has no MoE layers (moe_expert_count is 0)")
    try:
        expert_sharding(num_experts, world_size)
    except ValueError as e:
        raise MoEUsageError(str(e)) from None
    names = param_names_of(state, read_pointer(state, src))
    if names is None:
        raise MoEUsageError(f"{src} lacks parameter names (not written by moe_fairseq); cannot reshard optimizer state")
    state = resolve_experts(state, src, rank=0, world_size=1)  # every expert in one state
    full = split_experts(state, names)
    updates = state["optimizer_history"][-1].get("num_updates", 0) if state.get("optimizer_history") else 0
    run = new_run_id()
    tag = reshard_tag(updates, world_size, run)
    shards = [slice_shard(full, num_experts, rank, world_size) for rank in range(world_size)]
    old_world = (state.get("cfg") or {}).get("distributed_training", {}).get("distributed_world_size")
    itr = (state.get("extra_state") or {}).get("train_iterator")
    if itr and itr.get("iterations_in_epoch") and old_world != world_size:
        # Batches of an epoch are split over ranks, so a position inside an epoch means nothing
        # on another world size: continue at the start of the next epoch (fairseq would refuse
        # with "dataloader mismatch").
        print(f"note: the run stopped inside epoch {itr['epoch']}; continuing at the start of epoch "
              f"{itr['epoch'] + 1} on {world_size} ranks")
        itr.update(epoch=itr["epoch"] + 1, iterations_in_epoch=0)
    point_to_shards(state, tag, world_size, names, run=run, shapes=tensor_shapes(shards[0]["model"]))
    created = [d for d in (out_dir, os.path.join(out_dir, SHARD_ROOT)) if not os.path.exists(d)]
    try:
        for rank, shard in enumerate(shards):
            shard["meta"] = shard_meta(rank, world_size, tag, updates, run)
            atomic_save(shard, shard_path(out_dir, tag, rank, world_size))
        atomic_save(state, os.path.join(out_dir, name))  # written last: it makes the set visible
    except BaseException:  # a full disk, an interrupt: remove what this call wrote
        shutil.rmtree(os.path.join(out_dir, SHARD_ROOT, tag), ignore_errors=True)
        for d in reversed(created):
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        raise
    remove_unreferenced_shards(out_dir, tag)  # a set an earlier reshard into out_dir left
    return os.path.join(out_dir, name)


def cli_main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--world-size", type=int, required=True, help="ranks of the run that will continue")
    p.add_argument("--name", default="checkpoint_last.pt", help="file name in out_dir (checkpoint_last.pt)")
    args = p.parse_args(argv)
    try:
        path = reshard(args.checkpoint, args.out_dir, args.world_size, args.name)
    except MoEUsageError as e:
        sys.exit(f"moe-reshard: error: {e}")
    print(f"wrote {path} with {args.world_size} expert shards")


if __name__ == "__main__":
    cli_main()
