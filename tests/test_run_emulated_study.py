"""scripts/run_emulated_study.sh refuses bad settings in one line naming the variable, before it
builds a cluster or trains anything.  (The driver end to end is a study of hours: it was
checked by a smoke run of a few updates, docs/emulated_network.md.)"""
import json
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
    ({"AVERAGE": "1"}, "AVERAGE"),
    ({"AVERAGE": "last"}, "AVERAGE"),
    ({"BUDGET_OF": "fairseq_dense"}, "BUDGET_OF"),
    ({"RUNS": "moe_top2=moe_top2", "BUDGET_OF": "gate_drop_p0.3"}, "BUDGET_OF"),
    ({"CONTINUE_TO": "520"}, "CONTINUE_TO"),
    ({"CONTINUE_TO": "500"}, "CONTINUE_TO"),  # not above MAX_UPDATE
    ({"CONTINUE_TO": "700", "RUNS": "x=moe_top2:--lr-scheduler,polynomial_decay"}, "polynomial_decay"),
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


def test_readings_at_the_anchors_and_another_runs_budget_with_averages(tmp_path):
    """The driver end to end on the emulated cluster with stand-ins for torchrun (a fairseq json
    log and interval checkpoints), moe-evaluate and moe-average: every run is read at the anchor's
    budget on each link, single and averaged; with BUDGET_OF every run but the anchor is read
    again at that run's budget in a mirror (the anchor's readings untouched) and archived apart;
    a rerun reads nothing again."""
    import torch

    from stand_ins import MOE_EVALUATE, write_tools
    from test_emulated_cluster import _SKIP

    if _SKIP:
        pytest.skip(_SKIP)
    fake, data, out, archive = tmp_path / "fakebin", tmp_path / "bin", tmp_path / "out", tmp_path / "archive"
    (data / "raw").mkdir(parents=True)
    (data / "dict.txt").write_text("a 1\n")
    refs = ["a man rides a bike", "two dogs run", "a blue shirt"]
    for lang in ("de", "fr", "cs"):
        (data / "raw" / f"test.{lang}").write_text("\n".join(refs) + "\n")
    template = tmp_path / "ckpt.pt"
    torch.save({"last_optimizer_state": None}, template)
    torchrun = (
        "#!/bin/bash\n"
        'while [ $# -gt 0 ]; do case $1 in --save-dir) save=$2;; esac; shift; done\n'
        '[ "$NODE_RANK" = 0 ] || exit 0\n'
        "for u in 50 100 150 200; do\n"
        '  echo "2026-12-06 10:00:0${u:0:1} | INFO | train_inner | {\\"num_updates\\": \\"$u\\", \\"loss\\": \\"6\\", '
        '\\"wps\\": \\"1000\\", \\"wpb\\": \\"3000\\", \\"wall\\": \\"$u\\"}"\n'
        '  echo "2026-12-06 10:00:0${u:0:1} | INFO | valid | {\\"valid_loss\\": \\"5.$u\\", \\"valid_num_updates\\": \\"$u\\"}"\n'
        f'  cp {template} "$save/checkpoint_1_$u.pt"\n'
        "done\n"
        f'cp {template} "$save/checkpoint_last.pt"\n')
    average = ("#!/bin/bash\n"
               'echo "$*" >> "$(dirname "$0")/average.calls"\n'
               'while [ $# -gt 0 ]; do case $1 in --output) o=$2;; esac; shift; done\n'
               'touch "$o"\n')
    # fairseq-train only has to exist: the stand-in torchrun is what runs
    write_tools(fake, torchrun=torchrun, moe_evaluate=MOE_EVALUATE, moe_average=average,
                fairseq_train="#!/bin/sh\nexit 1\n")
    # the anchor's 200 updates: top-2 (0.5x) reaches update 100, Gate-Drop (0.6x) 120, read at 100;
    # Gate-Drop's 200 updates: top-2 (0.5 / 0.6) reaches 166, read at 150
    speeds = {"fairseq_dense": 1.0, "moe_top2": 0.5, "gate_drop_p0.3": 0.6}
    link = out / "link0mbit"
    link.mkdir(parents=True)
    for r in (250, 0):
        (link / f"throughput_link{r}mbit.json").write_text(json.dumps({
            "anchor": "fairseq_dense", "rounds": 1, "threads": 1,
            "configs": {c: {"ups": v, "wps": 1000 * v, "ratio": v} for c, v in speeds.items()},
            "raw": {c: [{"ups": v}] for c, v in speeds.items()}}))
    runs = "fairseq_dense=fairseq_dense moe_top2=moe_top2 gate_drop_p0.3=moe_top2_gate_drop:--moe-gating-dropout,0.3"
    env = {"DATA": str(data), "OUT": str(out), "ARCHIVE": str(archive), "RUNS": runs, "SEEDS": "1",
           "MAX_UPDATE": "200", "THROUGHPUT_ROUNDS": "0", "AVERAGE": "2", "BUDGET_OF": "gate_drop_p0.3",
           "READ_RATES": "250 0", "PYTHONPATH": str(REPO),
           "PATH": f"{fake}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def drive():
        proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env={**os.environ, **env},
                              timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    drive()
    rec = lambda *p: json.loads((archive.joinpath(*p) / "seed1" / "record.json").read_text())  # noqa: E731
    for r in (250, 0):
        top2, gate, dense = (rec(f"link{r}mbit", c) for c in ("moe_top2", "gate_drop_p0.3", "fairseq_dense"))
        assert (top2["equal_time"]["updates"], gate["equal_time"]["updates"], dense["equal_time"]["updates"]) == (100, 100, 200)
        assert top2["averaged"] == {"last": 2, "final": {"updates": 200, "bleu": top2["bleu"]},
                                    "equal_time": {"updates": 100, "bleu": top2["bleu"]}}
        assert (archive / f"link{r}mbit" / "moe_top2" / "seed1" / "eval_avg2_u100" / "results.json").is_file()
        budget = archive / "budget_gate_drop_p0.3" / f"link{r}mbit"
        assert sorted(p.name for p in budget.iterdir() if p.is_dir()) == ["gate_drop_p0.3", "moe_top2"]
        assert json.loads((budget / "throughput.json").read_text())["anchor"] == "gate_drop_p0.3"
        b_top2, b_gate = rec(budget, "moe_top2"), rec(budget, "gate_drop_p0.3")
        assert (b_top2["equal_time"]["updates"], b_gate["equal_time"]["updates"]) == (150, 200)
        assert b_top2["equal_time"]["ratio"] == pytest.approx(0.5 / 0.6)
        assert b_top2["averaged"]["equal_time"]["updates"] == 150
        assert (budget / "moe_top2" / "seed1" / "eval_u150" / "results.json").is_file()
    # the anchor's readings are the run's own; the budget's evaluations stay in the mirror
    save = link / "moe_top2" / "seed1"
    assert not (save / "eval_u150").exists() and (out / "budget_gate_drop_p0.3" / "link0mbit" / "moe_top2" / "seed1" / "eval_u150").is_dir()
    averages = (fake / "average.calls").read_text().splitlines()
    # each averaged checkpoint is made once per directory: top-2 at 200 and 100, at 200 and 150 in
    # each link's mirror; Gate-Drop likewise; the anchor at 200
    assert all(len(c.split("--inputs")[1].split("--output")[0].split()) == 2 for c in averages)
    evals, n_avg = len((fake / "eval.calls").read_text().splitlines()), len(averages)
    drive()  # everything is archived: nothing is evaluated again
    assert len((fake / "eval.calls").read_text().splitlines()) == evals
    assert len((fake / "average.calls").read_text().splitlines()) == n_avg


def test_runs_continued_past_their_budget_for_the_validation_curve(tmp_path):
    """CONTINUE_TO: after its readings each run is continued from its last checkpoint with the
    same flags to CONTINUE_TO updates in a directory of its own (fairseq resumes from
    --restore-file), recorded from its log alone and archived apart; the run's own record is
    untouched, a rerun trains nothing, and an interrupted continuation resumes from its own
    checkpoint (no --restore-file)."""
    import torch

    from stand_ins import MOE_EVALUATE, write_tools
    from test_emulated_cluster import _SKIP

    if _SKIP:
        pytest.skip(_SKIP)
    fake, data, out, archive = tmp_path / "fakebin", tmp_path / "bin", tmp_path / "out", tmp_path / "archive"
    (data / "raw").mkdir(parents=True)
    (data / "dict.txt").write_text("a 1\n")
    for lang in ("de", "fr", "cs"):
        (data / "raw" / f"test.{lang}").write_text("a man rides a bike\ntwo dogs run\n")
    template = tmp_path / "ckpt.pt"
    torch.save({"last_optimizer_state": None}, template)
    # fairseq-train's resume, in miniature: from --restore-file if given, else from the save
    # dir's checkpoint_last.pt (its update in last_update), to --max-update; the loss falls with u
    torchrun = (
        "#!/bin/bash\n"
        'while [ $# -gt 0 ]; do case $1 in --save-dir) save=$2;; --max-update) max=$2;; --restore-file) restore=$2;; esac; shift; done\n'
        '[ "$NODE_RANK" = 0 ] || exit 0\n'
        'echo "save=$save max=$max restore=${restore:-none}" >> "$(dirname "$0")/train.calls"\n'
        "start=50\n"
        'if [ -n "$restore" ]; then start=$(( $(cat "$(dirname "$restore")/last_update") + 50 ));\n'
        'elif [ -f "$save/checkpoint_last.pt" ]; then start=$(( $(cat "$save/last_update") + 50 )); fi\n'
        'for u in $(seq $start 50 $max); do\n'
        '  echo "2026-12-06 10:00:0${u:0:1} | INFO | train_inner | {\\"num_updates\\": \\"$u\\", \\"loss\\": \\"6\\", '
        '\\"wps\\": \\"1000\\", \\"wpb\\": \\"3000\\", \\"wall\\": \\"$u\\"}"\n'
        '  echo "2026-12-06 10:00:0${u:0:1} | INFO | valid | {\\"valid_loss\\": \\"$((1000 - u))\\", \\"valid_num_updates\\": \\"$u\\"}"\n'
        f'  cp {template} "$save/checkpoint_1_$u.pt"\n'
        "done\n"
        'echo "$max" > "$save/last_update"\n'
        f'cp {template} "$save/checkpoint_last.pt"\n')
    write_tools(fake, torchrun=torchrun, moe_evaluate=MOE_EVALUATE, fairseq_train="#!/bin/sh\nexit 1\n")
    runs = "moe_top2=moe_top2 gate_drop_p0.3=moe_top2_gate_drop:--moe-gating-dropout,0.3"
    env = {"DATA": str(data), "OUT": str(out), "ARCHIVE": str(archive), "RUNS": runs, "SEEDS": "1",
           "MAX_UPDATE": "200", "CONTINUE_TO": "300", "THROUGHPUT_ROUNDS": "0", "AVERAGE": "0", "READ_RATES": "0",
           "PYTHONPATH": str(REPO),
           "PATH": f"{fake}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def drive():
        proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env={**os.environ, **env},
                              timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return (fake / "train.calls").read_text().splitlines()

    calls = drive()
    save, cont = out / "link0mbit" / "gate_drop_p0.3" / "seed1", out / "continued_to300" / "gate_drop_p0.3" / "seed1"
    assert f"save={cont} max=300 restore={save.resolve()}/checkpoint_last.pt" in calls
    assert len(calls) == 4  # two runs, two continuations
    run = json.loads((archive / "link0mbit" / "gate_drop_p0.3" / "seed1" / "record.json").read_text())
    assert [p["updates"] for p in run["valid"]] == [50, 100, 150, 200] and "continued" not in json.dumps(run)
    rec = json.loads((archive / "continued_to300" / "gate_drop_p0.3" / "seed1" / "record.json").read_text())
    assert [(p["updates"], p["loss"]) for p in rec["valid"]] == [(250, 750.0), (300, 700.0)]
    assert "bleu" not in rec and rec["config"] == "gate_drop_p0.3" and rec["seed"] == 1
    i = rec["flags"].index("--restore-file")
    assert rec["flags"][:i] + rec["flags"][i + 2:] == run["flags"]  # the run's flags, resumed
    assert drive() == calls  # everything is done: nothing trains again
    # a continuation interrupted after its first checkpoint resumes from it, not from the run's
    (archive / "continued_to300" / "gate_drop_p0.3" / "seed1" / "record.json").unlink()
    (cont / ".trained").unlink()
    calls2 = drive()
    assert calls2[:-1] == calls and calls2[-1] == f"save={cont} max=300 restore=none"
    assert (archive / "continued_to300" / "gate_drop_p0.3" / "seed1" / "record.json").is_file()
