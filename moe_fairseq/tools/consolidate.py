"""moe-consolidate: one self-contained checkpoint from an expert-sharded one.

    moe-consolidate save_dir/checkpoint_best.pt model.pt

The result holds every expert (and, unless --no-optimizer, their optimizer state) in one file
that plain `fairseq-generate --user-dir moe_fairseq --path model.pt` loads on one CPU or GPU,
and that training on any world size can resume from (see reshard for the other direction).
"""
import argparse
import os
import sys

from ..checkpoint.format import is_expert_key
from ..checkpoint.io import read_checkpoint
from ..checkpoint.sharded import atomic_save, resolve_experts
from ..moe.errors import MoEUsageError


def consolidate(src: str, dst: str, keep_optimizer: bool = True) -> dict:
    if os.path.abspath(src) == os.path.abspath(dst):
        raise MoEUsageError("the consolidated checkpoint must not overwrite its source")
    state = read_checkpoint(src)
    state = resolve_experts(state, src, rank=0, world_size=1)  # drops the pointer
    if not keep_optimizer:
        state["last_optimizer_state"] = None
    atomic_save(state, dst)  # only once every shard has been read and checked: no partial output
    return state


def cli_main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint written by expert-parallel training (or any moe_fairseq one)")
    p.add_argument("output", help="path of the consolidated checkpoint to write")
    p.add_argument("--no-optimizer", action="store_true", help="drop the optimizer state (smaller file)")
    args = p.parse_args(argv)
    try:
        state = consolidate(args.checkpoint, args.output, keep_optimizer=not args.no_optimizer)
    except MoEUsageError as e:
        sys.exit(f"moe-consolidate: error: {e}")
    experts = sum(1 for k in state["model"] if is_expert_key(k))
    print(f"wrote {args.output} ({experts} expert tensors, optimizer state "
          f"{'kept' if state.get('last_optimizer_state') else 'dropped'})")


if __name__ == "__main__":
    cli_main()
