"""scripts/run_emulated_study.sh refuses bad settings in one line naming the variable, before it
builds a cluster or trains anything.  (The driver end to end is a study of hours: it was
checked by a smoke run of a few updates, docs/emulated_network.md.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "run_emulated_study.sh"


def run(tmp_path, **env):
    data = tmp_path / "bin"
    data.mkdir(exist_ok=True)
    (data / "dict.txt").write_text("a 1\n")
    full = {**os.environ, "DATA": str(data), "OUT": str(tmp_path / "out"),
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"], **env}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=full, timeout=60)


@pytest.mark.parametrize("env,needle", [
    ({"READ_RATES": "250 fast"}, "READ_RATES"),
    ({"TRAIN_RATE_MBIT": "-1"}, "TRAIN_RATE_MBIT"),
    ({"MAX_UPDATE": "120"}, "MAX_UPDATE"),
    ({"MAX_TOKENS": "0"}, "MAX_TOKENS"),
    ({"THROUGHPUT_ROUNDS": "two"}, "THROUGHPUT_ROUNDS"),
    ({"RUNS": "moe_top2=moe_top2", "THROUGHPUT_RUNS": "x=no_such_config"}, "no_such_config"),
    ({"RUNS": "top2=no_such_config"}, "no_such_config"),
    ({"RUNS": "moe_top2"}, "NAME=CONFIG"),
])
def test_bad_settings_are_refused_in_one_line(tmp_path, env, needle):
    proc = run(tmp_path, **env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()  # nothing was started


def test_missing_data_bin_is_named(tmp_path):
    proc = run(tmp_path, DATA=str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "DATA=" in proc.stderr and "nowhere" in proc.stderr


def test_a_failed_training_is_not_marked_trained(tmp_path):
    """Both nodes' trainer fails (a torchrun that exits 3): the run is reported as failed in
    training, not marked trained and not evaluated; the driver exits 1 and leaves no namespace."""
    from moe_fairseq.experiments import emulated_cluster as ec
    from test_emulated_cluster import _SKIP

    if _SKIP:
        pytest.skip(_SKIP)
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "torchrun").write_text("#!/bin/sh\necho fake torchrun on node $NODE_RANK\nexit 3\n")
    (fake / "torchrun").chmod(0o755)
    proc = run(tmp_path, RUNS="moe_top2=moe_top2", SEEDS="1", THROUGHPUT_ROUNDS="0",
               PATH=f"{fake}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    save = tmp_path / "out" / "link0mbit" / "moe_top2" / "seed1"
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "failed in training" in proc.stderr
    assert not (save / ".trained").exists() and not (save / "eval.log").exists()
    assert "fake torchrun on node 0" in (save / "train.log").read_text()
    assert "fake torchrun on node 1" in (save / "train.node1.log").read_text()
    assert [n for n in ec.list_namespaces() if n.startswith("emc") and not ec._owner_alive(n, "emc")] == []
