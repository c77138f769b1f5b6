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
