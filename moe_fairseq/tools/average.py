"""moe-average: average the parameters of several checkpoints of one MoE run, as fairseq's
scripts/average_checkpoints.py does for dense models (that script is not part of the fairseq
pip package).

    moe-average --inputs ckpt/checkpoint_3_900.pt ckpt/checkpoint_3_1000.pt --output avg.pt
    moe-average --inputs ckpt/ --num-update-checkpoints 5 --output avg.pt   # the last 5 checkpoint_E_U.pt
    moe-average --inputs ckpt/ --num-epoch-checkpoints 5 --output avg.pt    # the last 5 checkpointE.pt

Every tensor of the model is averaged: shared parameters, every expert, routers, and buffers
such as SMoE-Dropout's frozen router weight (identical in every checkpoint of a run, so its
mean is itself; a difference means the inputs come from different runs, which is refused).
Floating-point tensors are summed in float64 and divided once, then cast back to their dtype;
integer tensors get fairseq's floor mean.

Expert-sharded inputs are consolidated in memory first (each may have been written by any
world size, and they may be mixed with consolidated files), so the result is one consolidated
file whatever the inputs: fairseq-generate loads it on one device; `moe-reshard` shards it
again for training.  Everything but the model (args, cfg, training state) is the first
input's, as in fairseq's script; the optimizer state is dropped (its moments belong to one of
the averaged points, not to the mean).  The output is written atomically.
"""
import argparse
import os
import re
import sys
from typing import List, Optional

import torch

from ..checkpoint.format import POINTER, moe_layer_names, refuse_int8, router_tensor
from ..checkpoint.io import read_checkpoint
from ..checkpoint.saved_args import saved_args
from ..checkpoint.sharded import atomic_save, resolve_experts
from ..moe.errors import MoEUsageError
from ..moe.routers import ROUTERS


def frozen_router_tensors(state: dict) -> List[str]:
    """The model's router tensors fixed at initialisation (Router.frozen_tensors: SMoE-Dropout's
    random router weight, a buffer never trained)."""
    saved = saved_args(state)
    if not saved.num_experts:
        return []
    frozen = ROUTERS[saved.router].frozen_tensors
    return [name for layer in moe_layer_names(state["model"]) for name in state["model"]
            if router_tensor(layer, name) in frozen]


def last_n_checkpoints(directory: str, n: int, update_based: bool, upper_bound: Optional[int] = None) -> List[str]:
    """The n newest checkpoint_E_U.pt (update_based) or checkpointE.pt files, newest first
    (fairseq's scripts/average_checkpoints.py rule)."""
    pattern = re.compile(r"checkpoint_\d+_(\d+)\.pt" if update_based else r"checkpoint(\d+)\.pt")
    entries = []
    for name in os.listdir(directory):
        m = pattern.fullmatch(name)
        if m and (upper_bound is None or int(m.group(1)) <= upper_bound):
            entries.append((int(m.group(1)), name))
    flag = "--num-update-checkpoints" if update_based else "--num-epoch-checkpoints"
    if len(entries) < n:
        raise MoEUsageError(f"{flag} {n}: found only {len(entries)} {pattern.pattern} files in {directory}")
    return [os.path.join(directory, name) for _, name in sorted(entries, reverse=True)[:n]]


def load_consolidated(path: str) -> dict:
    state = read_checkpoint(path, "--inputs:")
    refuse_int8(state, path, "moe-average")
    if POINTER in state:
        state = resolve_experts(state, path, rank=0, world_size=1)  # every expert, in one state
    return state


def average_checkpoints(paths: List[str]) -> dict:
    """The first checkpoint's state with every model tensor replaced by the mean over `paths`."""
    if not paths:
        raise MoEUsageError("--inputs: no checkpoint to average")
    if len(set(map(os.path.abspath, paths))) != len(paths):
        raise MoEUsageError("--inputs lists a checkpoint twice")
    first, sums = None, {}
    for path in paths:
        state = load_consolidated(path)
        model = state["model"]
        if first is None:
            first = state
        else:
            check_compatible(first, state, paths[0], path)
        for name, tensor in model.items():
            value = tensor.to(torch.float64) if tensor.is_floating_point() else tensor.to(torch.int64)
            sums[name] = value if name not in sums else sums[name] + value
        if first is not state:
            del state, model  # freed before the next file is read: only the first state and the sums stay
    n = len(paths)
    averaged = {}
    for name, total in sums.items():
        dtype = first["model"][name].dtype
        averaged[name] = (total / n).to(dtype) if total.is_floating_point() else (total // n).to(dtype)
    first["model"] = averaged
    first.pop(POINTER, None)
    first["last_optimizer_state"] = None
    first["moe_averaged"] = {"inputs": [os.path.abspath(p) for p in paths]}
    return first


def check_compatible(first: dict, state: dict, first_path: str, path: str):
    """Same experts, same tensors of the same shapes, same frozen routers."""
    experts, first_experts = saved_args(state).num_experts, saved_args(first).num_experts
    if experts != first_experts:
        raise MoEUsageError(f"--inputs: {path} has {experts} experts per MoE layer, "
                            f"{first_path} has {first_experts}")
    a, b = first["model"], state["model"]
    if set(a) != set(b):
        name = sorted(set(a) ^ set(b))[0]
        raise MoEUsageError(f"--inputs: {path} and {first_path} hold different tensors (e.g. {name}): "
                            f"not checkpoints of one model")
    for name in a:
        if a[name].shape != b[name].shape:
            raise MoEUsageError(f"--inputs: {name} has shape {tuple(b[name].shape)} in {path} but "
                                f"{tuple(a[name].shape)} in {first_path}")
    for name in frozen_router_tensors(first):
        if not torch.equal(a[name], b[name]):
            raise MoEUsageError(f"--inputs: the frozen {saved_args(first).router} router {name} differs between "
                                f"{first_path} and {path}: checkpoints of different runs")


def build_parser():
    p = argparse.ArgumentParser(prog="moe-average", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--inputs", required=True, nargs="+",
                   help="checkpoint files, or one save directory with --num-update/epoch-checkpoints")
    p.add_argument("--output", required=True, help="path of the averaged (consolidated) checkpoint")
    num = p.add_mutually_exclusive_group()
    num.add_argument("--num-update-checkpoints", type=int, metavar="N",
                     help="average the last N checkpoint_E_U.pt of the directory given as --inputs")
    num.add_argument("--num-epoch-checkpoints", type=int, metavar="N",
                     help="average the last N checkpointE.pt of the directory given as --inputs")
    p.add_argument("--checkpoint-upper-bound", type=int, metavar="U",
                   help="with --num-*-checkpoints: ignore checkpoints after update (or epoch) U")
    return p


def resolve_inputs(args) -> List[str]:
    n = args.num_update_checkpoints if args.num_update_checkpoints is not None else args.num_epoch_checkpoints
    if n is None:
        if args.checkpoint_upper_bound is not None:
            raise MoEUsageError("--checkpoint-upper-bound needs --num-update-checkpoints or --num-epoch-checkpoints")
        return list(args.inputs)
    if n < 1:
        raise MoEUsageError(f"--num-*-checkpoints must be >= 1 (got {n})")
    if len(args.inputs) != 1 or not os.path.isdir(args.inputs[0]):
        raise MoEUsageError("with --num-update-checkpoints / --num-epoch-checkpoints, --inputs must be one directory")
    return last_n_checkpoints(args.inputs[0], n, args.num_update_checkpoints is not None, args.checkpoint_upper_bound)


def main(argv=None) -> List[str]:
    """Average as the command line says; returns the averaged checkpoints' paths."""
    args = build_parser().parse_args(argv)
    paths = resolve_inputs(args)
    if any(os.path.abspath(p) == os.path.abspath(args.output) for p in paths):
        raise MoEUsageError(f"--output {args.output} is one of the inputs")
    atomic_save(average_checkpoints(paths), args.output)
    print(f"wrote {args.output}: the mean of {len(paths)} checkpoints ({', '.join(map(os.path.basename, paths))})")
    return paths


def cli_main(argv=None):
    try:
        main(argv)
    except MoEUsageError as e:
        sys.exit(f"moe-average: error: {e}")


if __name__ == "__main__":
    cli_main()
