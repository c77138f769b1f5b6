"""scripts/train_torchrun.sh on several GPUs and machines (dry runs, no GPU needed).

The GPU count comes from torch in the interpreter of fairseq-train, so that CUDA_VISIBLE_DEVICES
counts (nvidia-smi lists every GPU of the machine: two ranks on one GPU end in NCCL's "Duplicate
GPU detected").  Here a fake interpreter stands in for torch, answering like
torch.cuda.device_count() would, and a fake nvidia-smi lists 8 GPUs that must not be used.
Several machines need MASTER_ADDR and a valid NODE_RANK: one-line errors otherwise.
"""
import os
import shlex
import stat
import subprocess

import pytest

from cli_helpers import REPO

CONFIG = REPO / "configs" / "multi30k" / "moe_top2.args"
# torch.cuda.device_count() of a machine with 8 GPUs: the devices CUDA_VISIBLE_DEVICES lists, if set
FAKE_TORCH = """#!/bin/sh
case "$*" in *torch.cuda.device_count*) ;; *) exit 1 ;; esac
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
  printf '%s' "$CUDA_VISIBLE_DEVICES" | tr ',' '\\n' | grep -c . || true
else
  echo 8
fi
"""


def executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def machine(tmp_path):
    """A PATH with a fake nvidia-smi (8 GPUs) and a fairseq-train whose #! names a fake python."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "nvidia-smi", "#!/bin/sh\n" + "".join(f"echo 'GPU {i}: Fake (UUID: GPU-{i})'\n"
                                                             for i in range(8)))
    python = executable(bin_dir / "venv-python", FAKE_TORCH)
    train = executable(bin_dir / "fairseq-train", f"#!{python}\nimport fairseq_cli.train\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "NODE_RANK", "NNODES", "NPROC", "PYTHON", "CPU")}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", DRY_RUN="1", FAIRSEQ_TRAIN=str(train))
    return env


def launch(env, **extra):
    return subprocess.run(["bash", str(REPO / "scripts" / "train_torchrun.sh"), str(CONFIG), "DATA", "SAVE"],
                          capture_output=True, text=True, env={**env, **extra}, timeout=60)


def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


@pytest.mark.parametrize("visible,expected", [(None, 8), ("3", 1), ("0,1,5", 3), ("2,7", 2)])
def test_process_count_is_the_gpus_torch_sees(machine, visible, expected):
    proc = launch(machine, **({} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}))
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout)
    assert flag(cmd, "--nproc_per_node") == str(expected)
    assert flag(cmd, "--distributed-world-size") == str(expected)


def test_python_overrides_the_interpreter_of_fairseq_train(machine, tmp_path):
    other = executable(tmp_path / "other-python", "#!/bin/sh\necho 5\n")
    proc = launch(machine, PYTHON=str(other), CUDA_VISIBLE_DEVICES="0")
    assert proc.returncode == 0, proc.stderr
    assert flag(shlex.split(proc.stdout), "--nproc_per_node") == "5"


def test_no_visible_gpu_is_one_line(machine):
    proc = launch(machine, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("train_torchrun.sh: torch sees no GPU (CUDA_VISIBLE_DEVICES=''): "
                                   "set NPROC, or CPU=1 for a CPU (gloo) run")


def test_an_interpreter_without_torch_is_one_line(machine, tmp_path):
    broken = executable(tmp_path / "python-without-torch", "#!/bin/sh\necho 'No module named torch' >&2\nexit 1\n")
    proc = launch(machine, PYTHON=str(broken))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith(f"train_torchrun.sh: cannot count GPUs: '{broken} -c \"import torch\"' "
                                          "failed; set PYTHON")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("env,message", [
    (dict(NNODES="2", NODE_RANK="0"),
     "NNODES=2 needs MASTER_ADDR, the address of node 0 that every machine can reach"),
    (dict(NNODES="2", MASTER_ADDR="node0"), "NNODES=2 needs NODE_RANK (0 .. 1, 0 on the MASTER_ADDR machine)"),
    (dict(NNODES="2", MASTER_ADDR="node0", NODE_RANK="2"), "NODE_RANK must be 0 .. 1 with NNODES=2 (got '2')"),
    (dict(NNODES="4", MASTER_ADDR="node0", NODE_RANK="-1"), "NODE_RANK must be 0 .. 3 with NNODES=4 (got '-1')"),
    (dict(NNODES="2", MASTER_ADDR="node0", NODE_RANK="one"), "NODE_RANK must be 0 .. 1 with NNODES=2 (got 'one')"),
    (dict(NODE_RANK="1"), "NODE_RANK must be 0 .. 0 with NNODES=1 (got '1')"),
    (dict(NNODES="0"), "NNODES must be an integer >= 1 (got '0')"),
    (dict(NPROC="two"), "NPROC must be an integer >= 1 (got 'two')"),
])
def test_bad_multi_node_settings_are_one_line(machine, env, message):
    proc = launch(machine, **env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"train_torchrun.sh: {message}"


def test_two_machines_with_master_addr_and_node_rank(machine):
    for rank in ("0", "1"):
        proc = launch(machine, NNODES="2", NODE_RANK=rank, MASTER_ADDR="node0", CUDA_VISIBLE_DEVICES="0,1,2,3")
        assert proc.returncode == 0, proc.stderr
        cmd = shlex.split(proc.stdout)
        assert (flag(cmd, "--node_rank"), flag(cmd, "--master_addr")) == (rank, "node0")
        assert (flag(cmd, "--nproc_per_node"), flag(cmd, "--distributed-world-size")) == ("4", "8")


def test_one_machine_defaults_to_localhost(machine):
    proc = launch(machine, NPROC="2")
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout)
    assert (flag(cmd, "--nnodes"), flag(cmd, "--node_rank"), flag(cmd, "--master_addr")) == ("1", "0", "127.0.0.1")


FAKE_FAIRSEQ = """#!/bin/sh
echo 'fairseq set-up line'
echo '2026-12-06 00:07:23 | INFO | train_inner | {"epoch": 1, "loss": "13.359", "ppl": "10209", "moe_loss": "0.0162", "wps": "1977", "num_updates": "25"}'
echo '2026-12-06 00:09:01 | INFO | valid | {"epoch": 1, "valid_loss": "9.812", "valid_ppl": "898.3", "valid_num_updates": "50"}'
echo 'Traceback: something failed' >&2
exit 3
"""


@pytest.mark.parametrize("view", ["1", "0"])
def test_progress_is_short_on_a_terminal_and_json_in_the_log(tmp_path, view):
    """PROGRESS_VIEW=1 (what a terminal gets): short progress lines, every other line as is, the
    trainer's exit status kept; train.log holds fairseq's JSON lines either way."""
    fake = executable(tmp_path / "fairseq-train", FAKE_FAIRSEQ)
    save = tmp_path / "save"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "train.sh"), str(CONFIG), "DATA", str(save)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "FAIRSEQ_TRAIN": str(fake), "PROGRESS_VIEW": view})
    assert proc.returncode == 3
    log = (save / "train.log").read_text()
    assert '| train_inner | {"epoch": 1' in log and "Traceback: something failed" in log
    assert "fairseq set-up line" in proc.stdout and "Traceback: something failed" in proc.stdout
    if view == "1":
        assert "00:07:23 train update 25      loss 13.359  ppl 10209  moe_loss 0.0162  wps 1977" in proc.stdout
        assert "00:09:01 valid update 50      loss 9.812  ppl 898.3" in proc.stdout
        assert "{" not in proc.stdout
    else:
        assert '| train_inner | {"epoch": 1' in proc.stdout
