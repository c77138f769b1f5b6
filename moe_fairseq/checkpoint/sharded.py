"""Expert-sharded checkpoints: split a training state into shared + per-rank expert parts, and
merge them back for any world size.

The layout (names, pointer, version) is defined in format.py; the save hook that writes it
during training is in fairseq_patches.py.  The shard directory is named after (epoch, update)
and is complete before the fairseq file that points to it is written (atomically), so a crash
at any moment leaves every checkpoint file pointing at a complete set of shards: never a mix
of old and new.

Expert tensors are stacked per MoE layer with the expert as dimension 0 ([L, ...] on a rank,
[E, ...] in a single-process model), and so are their Adam moments; merging concatenates
along dimension 0, sharding slices it (see moe.expert_parallel.expert_sharding).
"""
import glob
import os
import shutil
from typing import Dict, List, Optional

import torch

from ..atomic_files import atomic_open
from ..moe.errors import MoEUsageError
from ..moe.expert_parallel import expert_sharding
from .format import (POINTER, SHARD_ROOT, is_expert_key, param_names_of, read_pointer, shard_paths,
                     tensor_shapes)
from .saved_args import saved_args


def atomic_save(obj, path: str):
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def _optimizer_state_by_name(opt_state: Optional[dict], param_names: List[str], keep) -> Dict[str, dict]:
    """Pop the per-parameter optimizer entries whose parameter name satisfies `keep`."""
    out = {}
    if not opt_state or "state" not in opt_state:
        return out
    for index, name in enumerate(param_names):
        if keep(name) and index in opt_state["state"]:
            out[name] = opt_state["state"].pop(index)
    return out


def split_experts(state: dict, param_names: List[str]) -> dict:
    """Remove the expert tensors and their optimizer entries from a fairseq training state (in
    place) and return them as a shard: {"model": {...}, "optimizer": {name: entry}}."""
    model = state["model"]
    shard_model = {k: model.pop(k) for k in [k for k in model if is_expert_key(k)]}
    shard_opt = _optimizer_state_by_name(state.get("last_optimizer_state"), param_names, is_expert_key)
    return {"model": shard_model, "optimizer": shard_opt}


def insert_experts(state: dict, shard: dict, param_names: List[str]):
    """Put a shard's expert tensors and optimizer entries back into a fairseq state (in place)."""
    state["model"].update(shard["model"])
    opt = state.get("last_optimizer_state")
    if opt is not None and "state" in opt:
        index = {name: i for i, name in enumerate(param_names)}
        for name, entry in shard["optimizer"].items():
            if name not in index:
                raise MoEUsageError(f"checkpoint shard has optimizer state for unknown parameter {name}")
            opt["state"][index[name]] = entry


def _map_tensors(entry, fn):
    if torch.is_tensor(entry):
        return fn(entry)
    if isinstance(entry, dict):
        return {k: _map_tensors(v, fn) for k, v in entry.items()}
    return entry


def _stacked(value) -> bool:
    """Per-expert tensors (params, Adam moments) have the expert dimension; scalars (step) don't."""
    return torch.is_tensor(value) and value.dim() > 0


def merge_shards(shards: List[dict], num_experts: int) -> dict:
    """Shards of ranks 0..W-1 -> one shard with every expert ([E, ...] tensors)."""
    world = len(shards)
    local, replicas = expert_sharding(num_experts, world)
    owners = list(range(world)) if replicas == 1 else [g * replicas for g in range(num_experts)]
    model = {}
    for name in shards[0]["model"]:
        model[name] = torch.cat([shards[r]["model"][name] for r in owners], dim=0)
    optimizer = {}
    for name, entry in shards[0]["optimizer"].items():
        merged = {}
        for key, value in entry.items():
            if _stacked(value):
                merged[key] = torch.cat([shards[r]["optimizer"][name][key] for r in owners], dim=0)
            else:
                merged[key] = value
        optimizer[name] = merged
    return {"model": model, "optimizer": optimizer}


def slice_shard(full: dict, num_experts: int, rank: int, world_size: int) -> dict:
    """The experts rank `rank` of `world_size` holds, from a merged shard."""
    local, replicas = expert_sharding(num_experts, world_size)
    first = rank * local if replicas == 1 else rank // replicas
    count = local

    def take(t):
        if t.shape[0] != num_experts:
            raise MoEUsageError(f"expert tensor of leading size {t.shape[0]} does not match "
                                f"--moe-expert-count={num_experts}")
        return t[first:first + count].clone()

    model = {k: take(v) for k, v in full["model"].items()}
    optimizer = {k: {kk: take(vv) if _stacked(vv) else vv for kk, vv in entry.items()}
                 for k, entry in full["optimizer"].items()}
    return {"model": model, "optimizer": optimizer}


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def read_shard(path: str, expect_world: int, expect_rank: int, expect_tag: str, expect_run: Optional[str] = None,
               shapes: Optional[Dict[str, List[int]]] = None) -> dict:
    """Read one expert shard and check it against its checkpoint's pointer: rank, world size,
    tag, the job that wrote it (`expect_run`, when the pointer records one) and the shape of
    every tensor (`shapes`, likewise).  Every refusal is one line naming the file."""
    if not os.path.exists(path):
        raise MoEUsageError(f"checkpoint shard {path} is missing (the checkpoint points to it)")
    try:
        shard = torch.load(path, map_location="cpu")
    except Exception as e:  # truncated or corrupt file; torch's own message spans many lines
        raise MoEUsageError(f"checkpoint shard {path} cannot be read, it is truncated or corrupt "
                            f"({_first_line(e)})") from None
    if not isinstance(shard, dict) or not isinstance(shard.get("model"), dict) or "meta" not in shard:
        raise MoEUsageError(f"checkpoint shard {path} is not a moe_fairseq expert shard (no meta/model)")
    meta = shard["meta"]  # see format.shard_meta
    if (meta.get("rank"), meta.get("world_size"), meta.get("tag")) != (expect_rank, expect_world, expect_tag):
        raise MoEUsageError(f"checkpoint shard {path} does not match its checkpoint: it holds rank "
                            f"{meta.get('rank')} of {meta.get('world_size')} from save {meta.get('tag')}, "
                            f"expected rank {expect_rank} of {expect_world} from save {expect_tag}")
    if expect_run is not None and meta.get("run") != expect_run:
        raise MoEUsageError(f"checkpoint shard {path} was written by another run (run id {meta.get('run')}, "
                            f"the checkpoint points to run {expect_run}'s save {expect_tag})")
    if shapes is not None:
        _check_shapes(path, shard, shapes)
    shard.setdefault("optimizer", {})
    return shard


def _check_shapes(path: str, shard: dict, shapes: Dict[str, List[int]]):
    model = shard["model"]
    missing = sorted(set(shapes) - set(model))
    extra = sorted(set(model) - set(shapes))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has an unexpected tensor {extra[0]}"
        raise MoEUsageError(f"checkpoint shard {path} {what} ({len(missing)} missing, {len(extra)} unexpected "
                            f"of the {len(shapes)} expert tensors its checkpoint lists)")
    for name, expected in shapes.items():
        if list(model[name].shape) != list(expected):
            raise MoEUsageError(f"checkpoint shard {path} has {name} of shape {list(model[name].shape)}, its "
                                f"checkpoint expects {list(expected)}")
    for name, entry in shard.get("optimizer", {}).items():
        expected = shapes.get(name)
        for key, value in (entry.items() if isinstance(entry, dict) else ()):
            if expected is not None and _stacked(value) and list(value.shape) != list(expected):
                raise MoEUsageError(f"checkpoint shard {path} has optimizer {key} of {name} of shape "
                                    f"{list(value.shape)}, its checkpoint expects {list(expected)}")


def resolve_experts(state: dict, checkpoint_path: str, rank: int, world_size: int) -> dict:
    """Make `state` hold exactly the experts of `rank` in a job of `world_size` ranks, whatever
    world size wrote it (a sharded checkpoint of any W, or a consolidated single file)."""
    pointer = read_pointer(state, checkpoint_path)
    state.pop(POINTER, None)
    num_experts = saved_args(state).num_experts
    param_names = param_names_of(state, pointer)
    if pointer is not None:
        paths = shard_paths(checkpoint_path, pointer)
        expect = dict(expect_tag=pointer["tag"], expect_run=pointer.get("run"), shapes=pointer.get("shapes"))
        if pointer["world_size"] == world_size:
            # Same layout: read this rank's shard only.
            shard = read_shard(paths[rank], world_size, rank, **expect)
            insert_experts(state, shard, param_names)
            return state
        shards = [read_shard(p, pointer["world_size"], r, **expect) for r, p in enumerate(paths)]
        if expect["shapes"] is None:  # a pointer without shapes: the shards must at least agree
            for path, shard in zip(paths[1:], shards[1:]):
                _check_shapes(path, shard, tensor_shapes(shards[0]["model"]))
        full = merge_shards(shards, num_experts)
    else:
        if world_size == 1 or not num_experts:
            return state
        if param_names is None:
            raise MoEUsageError(f"{checkpoint_path} was not written by moe_fairseq (no parameter names), so its "
                                f"optimizer state cannot be resharded; pass --reset-optimizer")
        full = split_experts(state, param_names)
    if world_size == 1:
        insert_experts(state, full, param_names)
    else:
        insert_experts(state, slice_shard(full, num_experts, rank, world_size), param_names)
    return state


def remove_stale_temporaries(save_dir: str):
    """Delete the temporary files of interrupted checkpoint writes under save_dir: fairseq's
    `<name>.pt.tmp`, atomic_save's `<name>.pt.tmp<pid>`, in save_dir and in its shard sets.
    Called when a save has completed, by the one process that writes the main files, when no
    write of this job is in progress (the other ranks wrote their shards before the barrier)."""
    patterns = [os.path.join(save_dir, "*.pt.tmp*"), os.path.join(save_dir, SHARD_ROOT, "*", "*.pt.tmp*")]
    for pattern in patterns:
        for path in glob.glob(pattern):
            try:
                os.remove(path)
            except OSError:
                pass


def _referenced_tags(save_dir: str):
    """Tags of the shard sets the checkpoint files in save_dir point to (None: unknown)."""
    tags = set()
    for path in glob.glob(os.path.join(save_dir, "checkpoint*.pt")):
        try:
            state = torch.load(path, map_location="cpu", mmap=True)
        except Exception:  # a file being written by someone else, or not ours: keep everything
            return None
        pointer = state.get(POINTER) if isinstance(state, dict) else None
        if pointer:
            tags.add(os.path.basename(pointer["dir"]))
    return tags


def remove_unreferenced_shards(save_dir: str, keep_tag: str):
    """Delete the shard sets under save_dir that no checkpoint file points to any more."""
    root = os.path.join(save_dir, SHARD_ROOT)
    tags = _referenced_tags(save_dir)
    if tags is None or not os.path.isdir(root):
        return
    for tag in os.listdir(root):
        if tag != keep_tag and tag not in tags:
            shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
