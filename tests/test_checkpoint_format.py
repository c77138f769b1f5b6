"""The checkpoint format module: one function makes the pointer and stamps FORMAT_VERSION, and
loading refuses a pointer of any other version in one line.  Torch only: no fairseq run."""
import torch
import pytest

from moe_fairseq.checkpoint import format as fmt
from moe_fairseq.tools.consolidate import consolidate
from moe_fairseq.checkpoint.sharded import atomic_save, resolve_experts, slice_shard, split_experts
from moe_fairseq.moe.errors import MoEUsageError

E, NAMES = 4, ["encoder.layers.1.fc1.moe.experts.w1", "encoder.layers.1.fc1.moe.router.wg.weight"]


def sharded_checkpoint(tmp_path, world_size=2, tag="e1-u5"):
    """A minimal checkpoint of a model with one MoE layer, written as W ranks would."""
    state = {"model": {NAMES[0]: torch.arange(E * 3.0).view(E, 3), NAMES[1]: torch.ones(E, 3)},
             "args": None, "cfg": {"model": {"moe_expert_count": E}},
             "last_optimizer_state": {"state": {0: {"exp_avg": torch.ones(E, 3), "step": torch.tensor(5.0)},
                                                1: {"exp_avg": torch.zeros(E, 3), "step": torch.tensor(5.0)}}}}
    full = split_experts(state, NAMES)
    for rank in range(world_size):
        shard = slice_shard(full, E, rank, world_size)
        shard["meta"] = fmt.shard_meta(rank, world_size, tag, 5)
        atomic_save(shard, fmt.shard_path(str(tmp_path), tag, rank, world_size))
    fmt.point_to_shards(state, tag, world_size, NAMES)
    path = tmp_path / "checkpoint_last.pt"
    atomic_save(state, str(path))
    return path


def test_pointer_is_stamped_with_the_format_version(tmp_path):
    path = sharded_checkpoint(tmp_path)
    state = torch.load(path)
    assert state[fmt.POINTER] == {"dir": "moe_shards/e1-u5", "tag": "e1-u5", "world_size": 2,
                                  "param_names": NAMES, "version": fmt.FORMAT_VERSION, "run": None, "shapes": None}
    assert state[fmt.PARAM_NAMES] == NAMES
    assert sorted(p.name for p in (tmp_path / fmt.SHARD_ROOT / "e1-u5").iterdir()) == ["rank-0-of-2.pt",
                                                                                      "rank-1-of-2.pt"]
    merged = resolve_experts(state, str(path), rank=0, world_size=1)
    assert fmt.POINTER not in merged
    assert torch.equal(merged["model"][NAMES[0]], torch.arange(E * 3.0).view(E, 3))


@pytest.mark.parametrize("version", [fmt.FORMAT_VERSION + 1, None])
def test_loading_refuses_an_unknown_pointer_version_in_one_line(tmp_path, version):
    path = sharded_checkpoint(tmp_path)
    state = torch.load(path)
    state[fmt.POINTER]["version"] = version
    with pytest.raises(MoEUsageError, match="format version") as err:
        resolve_experts(state, str(path), rank=0, world_size=1)
    assert "\n" not in str(err.value)
    atomic_save(state, str(path))
    with pytest.raises(MoEUsageError, match="format version"):
        consolidate(str(path), str(tmp_path / "model.pt"))
