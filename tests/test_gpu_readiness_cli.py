"""fairseq-train with --checkpoint-activations on a MoE arch (1 process, and 2 CPU processes
under torchrun with expert parallelism), and the one-line refusals of the fp16 flags fairseq 0.12
cannot run without a GPU."""
import argparse
import re

import pytest

from cli_helpers import BIN, free_port, make_tiny_corpus, run, train_cmd
from moe_fairseq.models.transformer_moe import HALF_PRECISION_FLAGS, check_precision_flags
from moe_fairseq.moe.errors import MoEUsageError

MOE = ["--moe-expert-count", "4", "--moe-router", "top2", "--moe-gating-dropout", "0.3", "--no-save"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("ckpt_corpus"), n_train=200)


def train_losses(log):
    return [float(v) for v in re.findall(r"train_inner \|.*?\bloss=([0-9.]+)", log)]


def test_checkpoint_activations_one_process_same_losses(data, tmp_path):
    """Same seed, dropout on: the checkpointed run logs exactly the plain run's losses."""
    plain = run(train_cmd(data, tmp_path / "a", *MOE, max_update=4))
    ckpt = run(train_cmd(data, tmp_path / "b", *MOE, "--checkpoint-activations", max_update=4))
    log = ckpt.stdout + ckpt.stderr
    assert "activation checkpointing: 2 MoE transformer layers checkpointed" in log
    losses = train_losses(log)
    assert len(losses) == 4 and losses == train_losses(plain.stdout + plain.stderr)


def test_checkpoint_activations_two_processes_expert_parallel(data, tmp_path):
    """Expert parallelism on 2 ranks, dropout and Gating Dropout on: the checkpointed run logs
    exactly the plain run's losses (the recomputation replays the forward's all-to-alls and
    random draws)."""
    logs = {}
    for name, extra in (("plain", []), ("ckpt", ["--checkpoint-activations"])):
        cmd = train_cmd(data, tmp_path / name, *MOE, *extra, max_update=3)
        proc = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *cmd])
        logs[name] = proc.stdout + proc.stderr
    log = logs["ckpt"]
    assert "'distributed_world_size': 2" in log
    assert "activation checkpointing: 2 MoE transformer layers" in log  # fairseq logs from rank 0 only
    assert max(float(v) for v in re.findall(r"moe_a2a_mb=([0-9.]+)", log)) > 0  # tokens crossed ranks
    losses = train_losses(log)
    assert len(losses) == 3 and losses == train_losses(logs["plain"])


def test_fp16_on_cpu_is_refused_in_one_line(data, tmp_path):
    proc = run(train_cmd(data, tmp_path / "fp16", *MOE, "--fp16", max_update=1), check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "moe_fairseq: error: --fp16 needs a CUDA GPU with fairseq 0.12 (--cpu is set): train in fp32 or with "
        "--bf16 on CPU")


@pytest.mark.parametrize("attr,flag", HALF_PRECISION_FLAGS)
def test_half_precision_flags_need_cuda(attr, flag):
    args = argparse.Namespace(**{attr: True}, cpu=False)
    with pytest.raises(MoEUsageError, match=f"^{flag} needs a CUDA GPU .*no CUDA GPU is available"):
        check_precision_flags(args, cuda_available=False)
    check_precision_flags(args, cuda_available=True)  # accepted on a GPU machine
    args.cpu = True
    with pytest.raises(MoEUsageError, match=r"--cpu is set"):
        check_precision_flags(args, cuda_available=True)
    check_precision_flags(argparse.Namespace(cpu=True), cuda_available=False)  # fp32 on CPU is fine
    for bf16 in ("bf16", "memory_efficient_bf16"):  # and so is bf16 (tests/test_precision_ranks.py trains it)
        check_precision_flags(argparse.Namespace(cpu=True, **{bf16: True}), cuda_available=False)
