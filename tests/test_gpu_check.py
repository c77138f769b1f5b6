"""scripts/gpu_check.sh keeps working on a machine without GPUs (DEVICE=cpu, QUICK=1).

Step 3 (expert parallelism) runs the same tests/ep_worker.py suite that a GPU machine runs on
NCCL, here on gloo with 2 CPU processes, started both ways the script offers (spawn, torchrun).
Steps 5-8 run fairseq-train through torchrun on 2 gloo ranks (expert parallel), a bit-exact
resume, moe-consolidate + fairseq-generate and the words/s of MoE against its dense twin.  A
half-precision mode must train like fp32, or be skipped because fairseq 0.12 refuses it without
CUDA (--memory-efficient-fp16, --amp), in one line that says so.  The test reads the JSON report
and the printed table, not only the exit status."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import REPO

PRECISIONS = ("fp32", "memory-efficient-fp16", "amp", "bf16")
HALF_FLAGS = {"memory-efficient-fp16": "--memory-efficient-fp16", "amp": "--amp", "bf16": "--bf16"}
TRAIN_STEPS = [f"5 train {p} {ddp}" for p in PRECISIONS for ddp in ("pytorch_ddp", "legacy_ddp")]
EP_PASSED = r"expert parallelism on gloo: \d+ scenarios passed on 2 ranks \(cpu\)"
ALL_STEPS = ["1 precision tests", "2 layer benchmark", "3 expert parallelism", "4 host syncs", *TRAIN_STEPS,
             "6 resume bit-exact", "7 consolidate + generate", "8 words/s MoE vs dense"]


def gpu_check(*args, **env):
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env},
                          timeout=900)


def test_gpu_check_runs_on_cpu(tmp_path):
    report_path = tmp_path / "report.json"
    proc = gpu_check("--json", str(report_path), DEVICE="cpu", QUICK="1", WORK=str(tmp_path / "work"))
    out = proc.stdout
    assert report_path.exists(), out[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    rows = {r["step"]: r for r in report["steps"]}
    assert [r["step"] for r in report["steps"]] == ALL_STEPS, out[-3000:]
    assert report["device"] == "cpu" and report["quick"] is True

    assert "== 1. precision tests (cpu)" in out and rows["1 precision tests"]["status"] == "pass"
    assert " passed" in rows["1 precision tests"]["detail"] and "failed" not in rows["1 precision tests"]["detail"]
    assert "dense" in out.split("== 2.")[1]  # the benchmark printed its table with the dense limit
    assert rows["2 layer benchmark"]["status"] == "pass" and "ours/dense" in rows["2 layer benchmark"]["detail"]
    assert "== 3. expert parallelism on gloo (spawn, 2 processes)" in out
    assert rows["3 expert parallelism"]["status"] == "pass"
    assert re.fullmatch(EP_PASSED, rows["3 expert parallelism"]["detail"]), rows["3 expert parallelism"]
    if importlib.util.find_spec("moe_fairseq.moe.host_syncs") is None:
        assert rows["4 host syncs"]["status"] == "skip"
        assert rows["4 host syncs"]["detail"] == "skipped: moe_fairseq.moe.host_syncs not available"
    else:
        assert rows["4 host syncs"]["status"] == "pass", rows["4 host syncs"]
        assert (tmp_path / "work" / "host_syncs.json").exists()

    for ddp in ("pytorch_ddp", "legacy_ddp"):
        row = rows[f"5 train fp32 {ddp}"]
        assert row["status"] == "pass", row
        assert row["detail"].startswith("3 updates on 2 ranks (gloo), 2 of 4 experts per rank; loss ")
    for precision, flag in HALF_FLAGS.items():
        for ddp in ("pytorch_ddp", "legacy_ddp"):
            row = rows[f"5 train {precision} {ddp}"]
            if row["status"] == "skip":  # fairseq 0.12 refuses it without CUDA: said so, in one line
                assert row["detail"].startswith("skipped: needs CUDA with fairseq 0.12 (fairseq-train: "
                                                f"{flag} needs a CUDA GPU"), row
            else:  # a mode that trains on CPU (--bf16) must train like fp32
                assert row["status"] == "pass", row
                assert row["detail"].startswith("3 updates on 2 ranks (gloo)")

    resume = rows["6 resume bit-exact"]
    assert resume["status"] == "pass", resume
    assert resume["data"]["identical"] == resume["data"]["tensors"] > 0 and resume["data"]["first_half"] == 1
    generate = rows["7 consolidate + generate"]
    assert generate["status"] == "pass", generate
    assert generate["detail"].endswith("fairseq-generate en-xa on cpu: 20/20 test sentences")
    speed = rows["8 words/s MoE vs dense"]
    assert speed["status"] == "pass", speed
    moe, dense = speed["data"]["moe_wps"], speed["data"]["dense_wps"]
    assert moe > 0 and dense > 0 and speed["data"]["ratio"] == pytest.approx(moe / dense)
    assert "| dense twin |" in out.split("== 8")[1]

    # one table, every row in it with its status; the counts match the rows
    table = out.split("== gpu_check summary: DEVICE=cpu, GPUs visible: 0, QUICK=1")[1]
    for r in report["steps"]:
        assert any(line.startswith(r["step"]) and f" {r['status'].upper()} " in line for line in table.splitlines())
    counts = {s: sum(r["status"] == s for r in report["steps"]) for s in ("pass", "fail", "skip")}
    assert (report["passed"], report["failed"], report["skipped"]) == (counts["pass"], counts["fail"], counts["skip"])
    assert f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped" in table
    assert report["ok"] == (counts["fail"] == 0) and proc.returncode == (0 if report["ok"] else 1)
    assert out.rstrip().endswith("== gpu_check: OK")


def test_gpu_check_step_3_under_torchrun(tmp_path):
    proc = gpu_check(DEVICE="cpu", QUICK="1", STEPS="3", LAUNCHER="torchrun", OUT=str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== 1." not in proc.stdout and "== 2." not in proc.stdout and "== 5." not in proc.stdout
    assert "== 3. expert parallelism on gloo (torchrun, 2 processes)" in proc.stdout
    assert re.search(EP_PASSED, proc.stdout)
    assert [r["step"] for r in json.loads((tmp_path / "r.json").read_text())["steps"]] == ["3 expert parallelism"]


@pytest.mark.parametrize("args,env,message", [
    ((), dict(LAUNCHER="mpirun"), "gpu_check.sh: LAUNCHER must be spawn or torchrun (got 'mpirun')"),
    ((), dict(STEPS="9"), "gpu_check.sh: STEPS must list steps 1 to 8 (e.g. 12345678 or 3; got '9')"),
    ((), dict(STEPS="3", EP_PROCS="1"), "gpu_check.sh: EP_PROCS must be an integer >= 2 (got '1')"),
    ((), dict(UPDATES="1"), "gpu_check.sh: UPDATES must be an integer >= 2 (got '1')"),
    (("--out", "x"), {}, "gpu_check.sh: unknown argument '--out' (the only one is --json OUT; settings are "
                         "environment variables)"),
    (("--json",), {}, "gpu_check.sh: --json needs a path"),
])
def test_gpu_check_bad_settings_are_one_line(tmp_path, args, env, message):
    proc = gpu_check(*args, DEVICE="cpu", OUT=str(tmp_path / "r.json"), **env)
    assert proc.returncode == 2 and proc.stderr.strip() == message


def test_gpu_check_without_torch_is_one_line(tmp_path):
    proc = gpu_check(DEVICE="cpu", PYTHON="/bin/false", OUT=str(tmp_path / "r.json"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("gpu_check.sh: '/bin/false' cannot import torch: set PYTHON to the project's "
                                   "interpreter")


def test_gpu_check_refuses_cuda_without_gpu():
    proc = gpu_check(DEVICE="cuda")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpu_check.sh: DEVICE=cuda but torch sees no GPU; use DEVICE=cpu"


def test_report_fails_on_a_failed_step_not_on_a_skip(tmp_path):
    rows = tmp_path / "rows.tsv"
    rows.write_text("1 a\tpass\t1.0\tfine\n2 b\tskip\t0\tskipped: why\t{}\n3 c\tpass\t2.5\tok\t{\"x\": 1}\n")
    cmd = [sys.executable, str(REPO / "scripts" / "gpu_check_report.py"), str(rows), "--json", str(tmp_path / "r.json"),
           "--device", "cpu", "--gpus", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["ok"], report["passed"], report["failed"], report["skipped"]) == (True, 2, 0, 1)
    assert report["steps"][2] == {"step": "3 c", "status": "pass", "seconds": 2.5, "detail": "ok", "data": {"x": 1}}
    assert "\n2 b   SKIP        0.0  skipped: why\n" in proc.stdout
    with rows.open("a") as f:
        f.write("4 d\tfail\t3\texit status 1: broke\n")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1 and "2 passed, 1 failed, 1 skipped" in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is False
    rows.write_text("1 a\tmaybe\t1\tx\n")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stderr.strip().startswith(f"gpu_check_report.py: {rows}:1: not ")


def test_words_per_second_is_words_over_time_after_the_first_update():
    from moe_fairseq.experiments.gpu_check_fairseq import words_per_second as wps
    records = [{"num_updates": 1, "wpb": 1000.0, "wps": 1.0},  # set-up time: left out
               {"num_updates": 2, "wpb": 100.0, "wps": 50.0},  # 2 s
               {"num_updates": 3, "wpb": 300.0, "wps": 100.0}]  # 3 s
    assert wps(records) == pytest.approx(400 / 5)
    assert wps(records[:1]) is None


def test_a_failing_step_is_a_fail_row_and_exit_status_1(tmp_path):
    """A step whose command fails (here: pytest of step 1, through an interpreter that refuses it)
    is a FAIL in the table and the JSON, the others still run, and the logs are kept."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\ncase "$*" in *"-m pytest"*) echo "boom: no pytest here"; exit 3 ;; esac\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    proc = gpu_check(DEVICE="cpu", QUICK="1", STEPS="14", PYTHON=str(python), OUT=str(tmp_path / "r.json"))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    steps = json.loads((tmp_path / "r.json").read_text())["steps"]
    assert [(r["step"], r["status"]) for r in steps][0] == ("1 precision tests", "fail")
    assert steps[0]["detail"].startswith("exit status 3: boom: no pytest here (log: ")
    assert [r["step"] for r in steps] == ["1 precision tests", "4 host syncs"]
    work = proc.stdout.rstrip().rsplit("== gpu_check: FAILED (logs in ", 1)[1].rstrip(")")
    assert "boom: no pytest here" in (Path(work) / "logs" / "step1.log").read_text()
    shutil.rmtree(work)
