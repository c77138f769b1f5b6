"""scripts/gpu_check.sh keeps working on a machine without GPUs (DEVICE=cpu, QUICK=1)."""
import subprocess
import sys

from cli_helpers import REPO


def test_gpu_check_runs_on_cpu():
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "DEVICE": "cpu", "QUICK": "1", "PYTHON": sys.executable,
                               "OMP_NUM_THREADS": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "== 1. precision tests (cpu)" in out and " passed" in out and "failed" not in out
    assert "dense" in out.split("== 2.")[1]  # the benchmark printed its table with the dense limit
    assert out.rstrip().endswith("== gpu_check: OK")


def test_gpu_check_refuses_cuda_without_gpu():
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "DEVICE": "cuda", "PYTHON": sys.executable})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpu_check.sh: DEVICE=cuda but torch sees no GPU; use DEVICE=cpu"
