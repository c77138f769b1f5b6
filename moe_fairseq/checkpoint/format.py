"""The on-disk format of moe_fairseq checkpoints: every name and rule that the writers (the save
hook in fairseq_patches.py, moe-reshard) and the readers (loading, moe-consolidate,
moe-reshard) must agree on, defined once.

A training run on W ranks writes

    save_dir/checkpoint_last.pt                  fairseq's file: shared parameters, their
                                                 optimizer state, and state[POINTER]
    save_dir/moe_shards/<tag>/rank-R-of-W.pt     experts of rank R + their optimizer state

The pointer, {"dir", "tag", "world_size", "param_names", "version", "run", "shapes"}, is made
by `point_to_shards` only, which stamps FORMAT_VERSION; a reader refuses any other version (the
layout it describes may have changed).  Every checkpoint of a MoE model, sharded or not, also
holds state[PARAM_NAMES]: the parameter name of each optimizer slot, which is what makes
optimizer state reshardable.

"run" (an id drawn once per job and shared by its ranks) and "shapes" (each expert tensor's
shape on one rank) let a reader refuse, in one line naming the file, a shard that another job
wrote under the same tag (a copied or restored directory) or one whose tensors do not fit,
before anything is loaded into a model.  Both are optional: pointers written before they
existed are read as before (extra keys do not change the layout, so FORMAT_VERSION stays).
"""
import os
import re
import uuid
from typing import Dict, Iterable, List, Optional

from ..moe.errors import MoEUsageError

SHARD_ROOT = "moe_shards"  # directory (beside the checkpoint) holding one directory per shard set
POINTER = "moe_shards"  # key of the pointer in fairseq's checkpoint dict
PARAM_NAMES = "moe_param_names"  # key of the optimizer slots' parameter names
FORMAT_VERSION = 1

# fairseq parameter names of a MoE layer <layer> (e.g. encoder.layers.1.fc1.moe): its experts'
# weights <layer>.experts.{w1,b1,w2,b2}, and its router's tensors <layer>.router.<name>.
EXPERT_KEY = re.compile(r"(^|\.)moe\.experts\.(w1|b1|w2|b2)$")


def is_expert_key(name: str) -> bool:
    return EXPERT_KEY.search(name) is not None


def moe_layer_names(names: Iterable[str]) -> List[str]:
    """The MoE layers <layer> of a model's tensor names, in order."""
    return [name[:-len(".experts.w1")] for name in names if is_expert_key(name) and name.endswith(".experts.w1")]


def router_tensor(layer: str, name: str) -> Optional[str]:
    """The router's own name (e.g. wg.weight) of tensor `name` of MoE layer `layer`; None for
    a tensor that is not its router's."""
    head = f"{layer}.router."
    return name[len(head):] if name.startswith(head) else None


# An int8 checkpoint (moe-quantize, models/int8_inference.py) holds its weight matrices under
# these suffixes, int8 with fp32 scales beside them.
INT8_SUFFIXES = (".weight_int8", ".w1_int8", ".w2_int8")


def is_int8_state(model_state: dict) -> bool:
    return any(k.endswith(INT8_SUFFIXES) for k in model_state)


def refuse_int8(state: dict, path: str, tool: str):
    """The checkpoint tools average, prune and reshard fp32 weights: an int8 one is refused."""
    if is_int8_state(state.get("model", {})):
        raise MoEUsageError(f"{path} is an int8 checkpoint (moe-quantize): {tool} works on fp32 checkpoints; "
                            f"run it on the fp32 one, then quantize")


def optimizer_param_names(model, criterion) -> List[str]:
    """Names of the parameters in the order of the optimizer's slots (fairseq's trainer builds
    the optimizer from model then criterion parameters that require grad)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    names += [f"criterion.{n}" for n, p in criterion.named_parameters() if p.requires_grad]
    return names


def shard_tag(epoch: int, num_updates: int) -> str:
    """The shard set a training save writes (moe_shards/<tag>/)."""
    return f"e{epoch}-u{num_updates}"


def reshard_tag(num_updates: int, world_size: int, run: str) -> str:
    """The shard set moe-reshard writes: never an existing set's name (the run id is new)."""
    return f"resharded-u{num_updates}-w{world_size}-{run[:8]}"


def shard_filename(rank: int, world_size: int) -> str:
    return f"rank-{rank}-of-{world_size}.pt"


def shard_path(save_dir: str, tag: str, rank: int, world_size: int) -> str:
    return os.path.join(save_dir, SHARD_ROOT, tag, shard_filename(rank, world_size))


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def shard_meta(rank: int, world_size: int, tag: str, num_updates: int, run: Optional[str] = None) -> dict:
    """What a shard file says about itself, checked against its pointer when it is read."""
    return {"rank": rank, "world_size": world_size, "tag": tag, "num_updates": num_updates, "run": run}


def tensor_shapes(tensors: Dict[str, "torch.Tensor"]) -> Dict[str, List[int]]:
    return {name: list(t.shape) for name, t in tensors.items()}


def point_to_shards(state: dict, tag: str, world_size: int, param_names: List[str], run: Optional[str] = None,
                    shapes: Optional[Dict[str, List[int]]] = None):
    """Make `state` the main file of a sharded checkpoint (in place): the pointer to shard set
    `tag` of `world_size` ranks written by job `run`, whose expert tensors have `shapes` on
    every rank, stamped with FORMAT_VERSION, and the parameter names."""
    state[POINTER] = {"dir": os.path.join(SHARD_ROOT, tag), "tag": tag, "world_size": world_size,
                      "param_names": param_names, "version": FORMAT_VERSION, "run": run, "shapes": shapes}
    state[PARAM_NAMES] = param_names


def read_pointer(state: dict, checkpoint_path: str) -> Optional[dict]:
    """The pointer of a checkpoint (None for a single-file one), refused if its version is not
    FORMAT_VERSION."""
    pointer = state.get(POINTER)
    if pointer is not None and pointer.get("version") != FORMAT_VERSION:
        raise MoEUsageError(f"{checkpoint_path} points to expert shards of format version {pointer.get('version')}; "
                            f"this moe_fairseq reads version {FORMAT_VERSION} only")
    return pointer


def param_names_of(state: dict, pointer: Optional[dict]) -> Optional[List[str]]:
    return pointer["param_names"] if pointer else state.get(PARAM_NAMES)


def shard_paths(checkpoint_path: str, pointer: dict) -> List[str]:
    base = os.path.dirname(os.path.abspath(checkpoint_path))
    return [os.path.join(base, pointer["dir"], shard_filename(r, pointer["world_size"]))
            for r in range(pointer["world_size"])]
