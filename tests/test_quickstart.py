"""scripts/quickstart.sh, the README's main job, end to end in its fast mode (the same commands on
a small corpus for a few updates), and its exit status when training fails."""
import json
import sys
from pathlib import Path

from cli_helpers import REPO, run

SCRIPT = REPO / "scripts" / "quickstart.sh"


def quickstart(out, check=True):
    env = {"QUICKSTART_FAST": "1", "SETUP": "0", "VENV": str(Path(sys.executable).parent.parent), "OUT": str(out)}
    return run(["bash", SCRIPT], check=check, timeout=900, env=env)


def test_quickstart_runs_every_step_and_stops_on_a_failed_training(tmp_path):
    out = tmp_path / "qs"
    proc = quickstart(out)
    assert "done training" in (out / "train.log").read_text()
    assert (out / "checkpoints" / "checkpoint_best.pt").is_file()
    rows = json.loads((out / "eval" / "results.json").read_text())
    assert [r["direction"] for r in rows] == ["en-xa", "en-xb", "en-xc"]
    assert all(r["sentences"] == 20 and r["missing"] == 0 and isinstance(r["bleu"], float) and "bleu_copy_source" in r for r in rows)
    assert "| direction | BLEU | chrF | copy-source BLEU | sentences |" in proc.stdout

    # Run again into the same OUT with a damaged checkpoint_last.pt: fairseq-train fails on it,
    # and the script must say so with its exit status, although OUT still holds the first run's
    # checkpoint_best.pt that evaluation could score.
    (out / "eval" / "results.json").unlink()
    (out / "checkpoints" / "checkpoint_last.pt").write_bytes(b"not a checkpoint")
    failed = quickstart(out, check=False)
    assert failed.returncode != 0, failed.stdout[-2000:]
    assert not (out / "eval" / "results.json").exists()  # it stopped before evaluating
    # and it shows the end of the log, where fairseq's error and traceback are
    assert "quickstart: fairseq-train failed; the end of" in failed.stderr
    assert "Traceback (most recent call last)" in failed.stderr, failed.stderr[-2000:]
