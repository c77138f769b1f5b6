"""moe_fairseq.atomic_files: a failed write keeps the previous file and leaves no temporary."""
import json
import os

import pytest

from moe_fairseq.atomic_files import atomic_open, atomic_write_json, atomic_write_text


def test_write_replaces_the_file_and_creates_missing_directories(tmp_path):
    path = tmp_path / "a" / "b" / "record.json"
    atomic_write_json(path, {"bleu": 1.5})
    atomic_write_json(path, {"bleu": 2.5})
    assert json.loads(path.read_text()) == {"bleu": 2.5}
    atomic_write_text(path, "ü\n")
    assert path.read_text(encoding="utf-8") == "ü\n"
    assert os.listdir(path.parent) == ["record.json"]


@pytest.mark.parametrize("mode", ["w", "wb"])
def test_a_failure_while_writing_keeps_the_old_file_and_no_temporary(tmp_path, mode):
    path = tmp_path / "results.md"
    path.write_text("old\n")
    with pytest.raises(OSError, match="disk full"):
        with atomic_open(path, mode) as f:
            f.write("half of the new" if mode == "w" else b"half of the new")
            raise OSError("disk full")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["results.md"]


def test_only_whole_file_modes(tmp_path):
    with pytest.raises(ValueError, match="mode 'w' or 'wb'"):
        with atomic_open(tmp_path / "x", "a"):
            pass


def test_several_outputs_are_replaced_together_or_not_at_all(tmp_path, monkeypatch):
    """Every temporary is complete before the first rename: a failure (here the fsync of the
    second file) leaves every old file, no temporary and no directory this call created."""
    from moe_fairseq import atomic_files

    old = {name: f"old {name}\n" for name in ("a.en", "a.de")}
    for name, text in old.items():
        (tmp_path / name).write_text(text)
    calls = []
    real_fsync = os.fsync

    def fsync_fails_second(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError("disk full")
        real_fsync(fd)

    monkeypatch.setattr(atomic_files.os, "fsync", fsync_fails_second)
    targets = [tmp_path / "a.en", tmp_path / "a.de", tmp_path / "new" / "deeper" / "b.en"]
    with pytest.raises(OSError, match="disk full"):
        with atomic_files.atomic_outputs(targets, hidden=True) as handles:
            for handle in handles:
                handle.write("new\n")
    assert {name: (tmp_path / name).read_text() for name in old} == old
    assert sorted(os.listdir(tmp_path)) == ["a.de", "a.en"]
    monkeypatch.undo()
    with atomic_files.atomic_outputs(targets, hidden=True) as handles:
        for handle in handles:
            handle.write("new\n")
    assert [t.read_text() for t in targets] == ["new\n"] * 3
    assert sorted(os.listdir(tmp_path)) == ["a.de", "a.en", "new"]


def test_temporary_names(tmp_path):
    """`<file>.tmp<pid>` beside the target (checkpoint cleanup finds these), or a hidden name
    for data directories, whose readers skip dot files."""
    from moe_fairseq.atomic_files import atomic_outputs

    for hidden in (False, True):
        with atomic_outputs([tmp_path / "train.en"], hidden=hidden) as (handle,):
            names = [n for n in os.listdir(tmp_path) if n != "train.en"]
        assert len(names) == 1
        if hidden:
            assert names[0].startswith(".train.en.") and names[0].endswith(".tmp")
        else:
            assert names[0] == f"train.en.tmp{os.getpid()}"
    assert os.listdir(tmp_path) == ["train.en"]


def test_atomic_copy(tmp_path):
    from moe_fairseq.atomic_files import atomic_copy

    (tmp_path / "src.pt").write_bytes(bytes(range(256)) * 50)
    (tmp_path / "dst.pt").write_bytes(b"old")
    atomic_copy(tmp_path / "src.pt", tmp_path / "dst.pt")
    assert (tmp_path / "dst.pt").read_bytes() == bytes(range(256)) * 50
    assert sorted(os.listdir(tmp_path)) == ["dst.pt", "src.pt"]


def test_a_directory_another_process_creates_meanwhile_is_used_and_kept(tmp_path, monkeypatch):
    """Ranks write their shards into one new directory at the same time: the directory may appear
    between the check and the mkdir.  The write must go on, and a later failure must not remove
    the directory (the other rank's file may be in it)."""
    import moe_fairseq.atomic_files as af

    shard_dir = tmp_path / "moe_shards" / "e1-u3"
    real_mkdir = os.mkdir

    def racing_mkdir(path, *args, **kwargs):
        if os.fspath(path) == str(shard_dir):
            real_mkdir(path, *args, **kwargs)  # the other rank was first
        return real_mkdir(path, *args, **kwargs)  # FileExistsError here

    monkeypatch.setattr(af.os, "mkdir", racing_mkdir)
    with atomic_open(shard_dir / "rank-0-of-2.pt", "wb") as f:
        f.write(b"shard 0")
    assert (shard_dir / "rank-0-of-2.pt").read_bytes() == b"shard 0"
    other = tmp_path / "moe_shards" / "e1-u4"
    with pytest.raises(RuntimeError):
        with atomic_open(other / "rank-1-of-2.pt", "wb"):
            (other / "rank-0-of-2.pt").write_bytes(b"the other rank's")  # directory exists: made "meanwhile"
            raise RuntimeError("disk full")
    assert (other / "rank-0-of-2.pt").read_bytes() == b"the other rank's"
