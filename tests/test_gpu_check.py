"""scripts/gpu_check.sh keeps working on a machine without GPUs (DEVICE=cpu, QUICK=1).

Step 3 (expert parallelism) runs the same tests/ep_worker.py suite that a GPU machine runs on
NCCL, here on gloo with 2 CPU processes, started both ways the script offers (spawn, torchrun)."""
import subprocess
import sys

import pytest

from cli_helpers import REPO


def gpu_check(**env):
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env},
                          timeout=900)


def test_gpu_check_runs_on_cpu():
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "DEVICE": "cpu", "QUICK": "1", "PYTHON": sys.executable,
                               "OMP_NUM_THREADS": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "== 1. precision tests (cpu)" in out and " passed" in out and "failed" not in out
    assert "dense" in out.split("== 2.")[1]  # the benchmark printed its table with the dense limit
    assert "== 3. expert parallelism on gloo (spawn, 2 processes)" in out
    assert "expert parallelism on gloo: 4 scenarios passed on 2 ranks (cpu)" in out.split("== 3.")[1]
    assert out.rstrip().endswith("== gpu_check: OK")


def test_gpu_check_step_3_under_torchrun():
    proc = gpu_check(DEVICE="cpu", QUICK="1", STEPS="3", LAUNCHER="torchrun")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== 1." not in proc.stdout and "== 2." not in proc.stdout
    assert "== 3. expert parallelism on gloo (torchrun, 2 processes)" in proc.stdout
    assert "expert parallelism on gloo: 4 scenarios passed on 2 ranks (cpu)" in proc.stdout


@pytest.mark.parametrize("env,message", [
    (dict(LAUNCHER="mpirun"), "gpu_check.sh: LAUNCHER must be spawn or torchrun (got 'mpirun')"),
    (dict(STEPS="4"), "gpu_check.sh: STEPS must list steps 1, 2, 3 (e.g. 123 or 3; got '4')"),
    (dict(STEPS="3", EP_PROCS="1"), "gpu_check.sh: EP_PROCS must be an integer >= 2 (got '1')"),
])
def test_gpu_check_bad_settings_are_one_line(env, message):
    proc = gpu_check(DEVICE="cpu", **env)
    assert proc.returncode == 2 and proc.stderr.strip() == message


def test_gpu_check_refuses_cuda_without_gpu():
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "DEVICE": "cuda", "PYTHON": sys.executable})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpu_check.sh: DEVICE=cuda but torch sees no GPU; use DEVICE=cpu"
