"""Damaged or missing expert shards, and writes that fail half-way (a full disk): every reader
(loading for training or generation, moe-consolidate, moe-reshard) refuses in one line that
names the file and what is wrong, and nothing half-written is left behind.  Torch only, plus
fairseq's checkpoint_utils for its save functions: no training run (tests/test_faults.py has
the multi-process ones)."""
import errno
import os

import pytest
import torch

import moe_fairseq.plugin  # noqa: F401  (installs the patches: atomic torch_persistent_save and copy)
from moe_fairseq.checkpoint import format as fmt
from moe_fairseq.checkpoint import sharded
from moe_fairseq.tools.consolidate import cli_main as consolidate_main
from moe_fairseq.tools.reshard import cli_main as reshard_main
from moe_fairseq.tools.reshard import reshard
from moe_fairseq.atomic_files import atomic_copy
from moe_fairseq.checkpoint.sharded import atomic_save, resolve_experts, slice_shard, split_experts
from moe_fairseq.moe.errors import MoEUsageError

E = 4
W1, B1, ROUTER = ("encoder.layers.1.fc1.moe.experts.w1", "encoder.layers.1.fc1.moe.experts.b1",
                  "encoder.layers.1.fc1.moe.router.wg.weight")
NAMES = [W1, B1, ROUTER]


def write_sharded(save_dir, world_size=2, tag="e1-u5", run="run-a", seed=0):
    """A checkpoint of a model with one MoE layer written as W training ranks write it (run id
    and shapes in the pointer), with Adam state for every parameter."""
    g = torch.Generator().manual_seed(seed)
    w1, b1 = torch.randn(E, 3, 5, generator=g), torch.randn(E, 5, generator=g)
    state = {"model": {W1: w1, B1: b1, ROUTER: torch.ones(E, 3)}, "args": None,
             "cfg": {"model": {"moe_expert_count": E}},
             "optimizer_history": [{"num_updates": 5}],
             "last_optimizer_state": {"state": {
                 i: {"exp_avg": t * 0.1, "exp_avg_sq": t * t, "step": torch.tensor(5.0)}
                 for i, t in enumerate((w1, b1, torch.ones(E, 3)))}}}
    full = split_experts(state, NAMES)
    shapes = None
    for rank in range(world_size):
        shard = slice_shard(full, E, rank, world_size)
        shapes = fmt.tensor_shapes(shard["model"])
        shard["meta"] = fmt.shard_meta(rank, world_size, tag, 5, run)
        atomic_save(shard, fmt.shard_path(str(save_dir), tag, rank, world_size))
    fmt.point_to_shards(state, tag, world_size, NAMES, run=run, shapes=shapes)
    path = save_dir / "checkpoint_last.pt"
    atomic_save(state, str(path))
    return path


def shard_file(save_dir, rank, world_size=2, tag="e1-u5"):
    return save_dir / fmt.SHARD_ROOT / tag / fmt.shard_filename(rank, world_size)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "truncated or corrupt"


def reshape(path):
    shard = torch.load(path)
    shard["model"][W1] = shard["model"][W1][:, :, :4].clone()  # another expert FFN size
    torch.save(shard, path)
    return f"has {W1} of shape [2, 3, 4], its checkpoint expects [2, 3, 5]"


def reshape_moment(path):
    shard = torch.load(path)
    shard["optimizer"][B1]["exp_avg_sq"] = torch.zeros(2, 7)
    torch.save(shard, path)
    return f"has optimizer exp_avg_sq of {B1} of shape [2, 7], its checkpoint expects [2, 5]"


def from_another_run(path):
    # the same tag, rank and world size, written by another job (a copied-in directory)
    other = write_sharded(path.parents[3] / "other", run="run-b", seed=1)
    os.replace(other.parent / fmt.SHARD_ROOT / "e1-u5" / path.name, path)
    return "was written by another run (run id run-b, the checkpoint points to run run-a's save e1-u5)"


def remove(path):
    path.unlink()
    return "is missing (the checkpoint points to it)"


DAMAGE = {"truncated": truncate, "wrong_shape": reshape, "wrong_moment_shape": reshape_moment,
          "another_run": from_another_run, "missing": remove}


@pytest.fixture
def damaged(tmp_path, request):
    save = tmp_path / "ckpt"
    save.mkdir()
    path = write_sharded(save)
    bad = shard_file(save, 1)
    return path, bad, DAMAGE[request.param](bad)


def one_line_naming(err, path, what):
    text = str(err)
    assert "\n" not in text, text
    assert str(path) in text and what in text, text


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_loading_refuses_a_damaged_shard_in_one_line(damaged):
    path, bad, what = damaged
    # rank 1 of a 2-rank job reads its own shard; one process (fairseq-generate) reads both
    for rank, world in ((1, 2), (0, 1)):
        with pytest.raises(MoEUsageError) as err:
            resolve_experts(torch.load(path), str(path), rank=rank, world_size=world)
        one_line_naming(err.value, bad, what)
    # rank 0 of the 2-rank job does not read rank 1's file: its own shard loads
    state = resolve_experts(torch.load(path), str(path), rank=0, world_size=2)
    assert state["model"][W1].shape == (2, 3, 5)


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_moe_consolidate_refuses_and_writes_nothing(damaged, tmp_path, capsys):
    path, bad, what = damaged
    out = tmp_path / "model.pt"
    with pytest.raises(SystemExit) as exit_:
        consolidate_main([str(path), str(out)])
    message = str(exit_.value.code)
    assert message.startswith("moe-consolidate: error: ")
    one_line_naming(message, bad, what)
    assert not out.exists()
    assert not list(tmp_path.glob("model.pt*"))


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_moe_reshard_refuses_and_writes_nothing(damaged, tmp_path):
    path, bad, what = damaged
    out = tmp_path / "resharded"
    with pytest.raises(SystemExit) as exit_:
        reshard_main([str(path), str(out), "--world-size", "4"])
    message = str(exit_.value.code)
    assert message.startswith("moe-reshard: error: ")
    one_line_naming(message, bad, what)
    assert not out.exists()


def test_a_damaged_main_file_is_refused_in_one_line(tmp_path):
    path = write_sharded(tmp_path)
    truncate(path)
    for main in (consolidate_main, lambda a: reshard_main(a + ["--world-size", "1"])):
        with pytest.raises(SystemExit) as exit_:
            main([str(path), str(tmp_path / "out")])
        one_line_naming(exit_.value.code, path, "cannot be read as a checkpoint")
    assert not (tmp_path / "out").exists()


def test_an_intact_checkpoint_still_loads_and_merges_exactly(tmp_path):
    """The checks refuse nothing that is right: merging the 2 shards gives the experts and
    Adam moments that were split, exactly."""
    path = write_sharded(tmp_path)
    merged = resolve_experts(torch.load(path), str(path), rank=0, world_size=1)
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(E, 3, 5, generator=g)
    assert torch.equal(merged["model"][W1], w1)
    assert torch.equal(merged["last_optimizer_state"]["state"][0]["exp_avg_sq"], w1 * w1)
    out = reshard(str(path), str(tmp_path / "four"), 4)
    pointer = torch.load(out)[fmt.POINTER]
    assert pointer["shapes"][W1] == [1, 3, 5] and pointer["run"]
    back = resolve_experts(torch.load(out), out, rank=0, world_size=1)
    assert torch.equal(back["model"][W1], w1)


def failing_torch_save(monkeypatch, fail_on_call, after_bytes=100):
    """torch.save whose `fail_on_call`-th call writes `after_bytes` bytes, then raises ENOSPC."""
    original, calls = torch.save, [0]

    class Limited:
        def __init__(self, f):
            self.f, self.left = f, after_bytes

        def write(self, data):
            data = bytes(memoryview(data).cast("B"))
            if len(data) > self.left:
                self.f.write(data[:self.left])
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= len(data)
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == fail_on_call:
            assert not isinstance(f, (str, os.PathLike))  # atomic_save hands torch.save a file
            return original(obj, Limited(f), *args, **kwargs)
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_reshard_that_fails_half_way_leaves_no_partial_output(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    path = write_sharded(tmp_path / "src")
    out = tmp_path / "four"
    failing_torch_save(monkeypatch, fail_on_call=3)  # the third of 4 shards
    with pytest.raises((OSError, RuntimeError)):  # torch may re-raise the write error as its own
        reshard(str(path), str(out), 4)
    assert not out.exists()
    # an existing directory with an earlier reshard in it keeps it, untouched
    monkeypatch.undo()
    first = reshard(str(path), str(out), 4)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    failing_torch_save(monkeypatch, fail_on_call=5)  # the main file, after all 4 shards
    with pytest.raises((OSError, RuntimeError)):  # torch may re-raise the write error as its own
        reshard(str(path), str(out), 4)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert resolve_experts(torch.load(first), first, rank=0, world_size=1)["model"][W1].shape == (E, 3, 5)


def test_atomic_save_and_copy_keep_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint_last.pt"
    atomic_save({"model": {"x": torch.zeros(3)}}, str(target))
    failing_torch_save(monkeypatch, fail_on_call=1)
    with pytest.raises((OSError, RuntimeError)):  # torch may re-raise the write error as its own
        atomic_save({"model": {"x": torch.ones(1000)}}, str(target))
    assert torch.equal(torch.load(target)["model"]["x"], torch.zeros(3))
    assert os.listdir(tmp_path) == ["checkpoint_last.pt"]

    import shutil

    source = tmp_path / "checkpoint_1_8.pt"
    atomic_save({"model": {"x": torch.ones(1000)}}, str(source))

    def copy_half(source, target, *args, **kwargs):
        target.write(source.read()[:500])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", copy_half)
    with pytest.raises(OSError, match="No space left"):
        atomic_copy(str(source), str(target))
    assert torch.equal(torch.load(target)["model"]["x"], torch.zeros(3))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_1_8.pt", "checkpoint_last.pt"]


def test_fairseq_checkpoint_writes_are_atomic_once_patched(tmp_path, monkeypatch):
    """fairseq's own torch_persistent_save retries torch.save on the half-written handle and
    leaves <file>.tmp behind; its save_checkpoint copies over checkpoint_last.pt in place.
    Patched: one attempt, the old file intact, no temporary file, and the copy is atomic."""
    from fairseq import checkpoint_utils

    target = tmp_path / "checkpoint_last.pt"
    checkpoint_utils.torch_persistent_save({"model": {"x": torch.zeros(3)}}, str(target))
    failing_torch_save(monkeypatch, fail_on_call=1)
    with pytest.raises((OSError, RuntimeError)):
        checkpoint_utils.torch_persistent_save({"model": {"x": torch.ones(1000)}}, str(target))
    assert torch.equal(torch.load(target)["model"]["x"], torch.zeros(3))
    assert os.listdir(tmp_path) == ["checkpoint_last.pt"]
    monkeypatch.undo()
    checkpoint_utils.torch_persistent_save({"model": {"x": torch.ones(2)}}, str(tmp_path / "checkpoint_1_4.pt"))
    assert checkpoint_utils.PathManager.copy(str(tmp_path / "checkpoint_1_4.pt"), str(target), overwrite=True)
    assert torch.equal(torch.load(target)["model"]["x"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_1_4.pt", "checkpoint_last.pt"]


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / fmt.SHARD_ROOT / "e1-u2").mkdir(parents=True)
    stale = [tmp_path / "checkpoint_last.pt.tmp", tmp_path / "checkpoint_1_2.pt.tmp1234",
             tmp_path / fmt.SHARD_ROOT / "e1-u2" / "rank-1-of-2.pt.tmp99"]
    keep = [tmp_path / "checkpoint_last.pt", tmp_path / fmt.SHARD_ROOT / "e1-u2" / "rank-1-of-2.pt",
            tmp_path / "train.log"]
    for p in stale + keep:
        p.write_bytes(b"x")
    sharded.remove_stale_temporaries(str(tmp_path))
    assert [p.exists() for p in stale] == [False] * 3 and all(p.exists() for p in keep)
