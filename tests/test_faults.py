"""Faults in a 2-process expert-parallel fairseq-train (gloo on CPU), injected by
tests/fault_train.py: a rank that dies or hangs inside an all-to-all, a disk that fills up
while a shard is written, ranks given different flags.  In each case the job ends (non-zero,
within a bound) instead of hanging, the last complete checkpoint stays what checkpoint_last.pt
points to, and relaunching the same command continues to exactly the state of an
uninterrupted run: parameters, Adam moments and update number, bit for bit.  A finished run
continued elsewhere to more updates (--restore-file) is that longer run too, and plain fairseq's
data-parallel transformer resumes on every rank.

Damaged shards on disk are tests/test_checkpoint_damage.py (no training needed).
"""
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

import moe_fairseq.plugin  # noqa: F401  (allowlists the types fairseq checkpoints hold for torch.load)
from moe_fairseq.checkpoint.format import POINTER, SHARD_ROOT
from moe_fairseq.checkpoint.sharded import resolve_experts
from moe_fairseq.distributed.agreement import agreed_flag_values, first_disagreement

from cli_helpers import (BIN, REPO, USER_DIR, cli, kill_tree, free_port, lang_pairs, make_tiny_corpus, run,
                         torchrun_cmd, train_cmd)

FAULT_TRAIN = REPO / "tests" / "fault_train.py"
# 4 updates per epoch on 2 ranks; checkpoints at updates 2 (checkpoint_1_2.pt), 4 (end of
# epoch 1: checkpoint_last.pt only) and 6 (checkpoint_2_6.pt).  Gating Dropout and top-2's
# sampled second expert make the all-to-alls differ from step to step.
FLAGS = ["--moe-expert-count", "4", "--moe-router", "top2", "--moe-gating-dropout", "0.3", "--dropout", "0.0",
         "--save-interval-updates", "2", "--disable-validation"]
MAX_UPDATE = 6
EXIT_BOUND = 60  # seconds from the fault to the end of the job (measured: docs/benchmarks.md)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("faults_corpus"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run, under plain torchrun."""
    save = tmp_path_factory.mktemp("reference")
    run(torchrun_cmd(train_cmd(data, save, *FLAGS, max_update=MAX_UPDATE)))
    return save


def fault_cmd(data, save, *extra):
    cmd = train_cmd(data, save, *FLAGS, *extra, max_update=MAX_UPDATE)
    cmd[0] = str(FAULT_TRAIN)  # fairseq-train with the faults of MOE_FAULT_* injected
    return torchrun_cmd(cmd)


class Finished:
    def __init__(self, returncode, output, seconds_after_fault):
        self.returncode, self.output, self.seconds_after_fault = returncode, output, seconds_after_fault


def launch(cmd, tmp_path, timeout=300, **fault_env):
    """Run `cmd` to its end (killing its whole tree if it outlives `timeout`: a hang fails the
    test instead of blocking CI); the time from the injected fault to the end of the job."""
    stamp = tmp_path / f"fault-{time.monotonic_ns()}.time"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MOE_FAULT_STAMP=str(stamp), **fault_env)
    log = tmp_path / f"launch-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            pytest.fail(f"{cmd} still running after {timeout} s:\n{log.read_text()[-3000:]}")
    end = time.time()
    after = end - float(stamp.read_text()) if stamp.exists() else None
    return Finished(proc.returncode, log.read_text(), after)


def full_state(checkpoint: Path) -> dict:
    """Every expert and its Adam moments merged from the shards, as one process loads them."""
    return resolve_experts(torch.load(checkpoint), str(checkpoint), rank=0, world_size=1)


def assert_same_training_state(path, expected_path):
    got, want = full_state(path), full_state(expected_path)
    assert got["optimizer_history"][-1]["num_updates"] == want["optimizer_history"][-1]["num_updates"]
    assert got["model"].keys() == want["model"].keys()
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    got_opt, want_opt = got["last_optimizer_state"], want["last_optimizer_state"]
    assert got_opt["state"].keys() == want_opt["state"].keys()
    for slot, entry in want_opt["state"].items():
        for key, value in entry.items():  # exp_avg, exp_avg_sq, step
            other = got_opt["state"][slot][key]
            assert torch.equal(other, value) if torch.is_tensor(value) else other == value, (slot, key)
    assert got_opt["param_groups"][0]["lr"] == want_opt["param_groups"][0]["lr"]
    assert got["extra_state"]["train_iterator"] == want["extra_state"]["train_iterator"]


def updates(checkpoint):
    return torch.load(checkpoint)["optimizer_history"][-1]["num_updates"]


def assert_clean(save):
    """No temporary file of any write, and exactly the shard sets checkpoints point to."""
    assert not [p for p in save.rglob("*") if ".tmp" in p.name]
    pointed = {torch.load(p)[POINTER]["tag"] for p in save.glob("checkpoint*.pt")}
    assert {p.name for p in (save / SHARD_ROOT).iterdir()} == pointed


def test_rank_killed_inside_an_all_to_all_ends_the_job_and_relaunch_resumes_exactly(data, reference, tmp_path):
    """SIGKILL of rank 1 inside its first token exchange of update 4, under our launcher
    (scripts/train_torchrun.sh, which is torchrun plus --collective-timeout 600)."""
    save = tmp_path / "run"
    cmd = train_cmd(data, save, *FLAGS, max_update=MAX_UPDATE)
    config = tmp_path / "run.args"
    config.write_text("\n".join(map(str, cmd[4:cmd.index("--save-dir")] + cmd[cmd.index("--save-dir") + 2:])))
    launcher = ["bash", REPO / "scripts" / "train_torchrun.sh", config, data, save]
    env = dict(CPU="1", NPROC="2", TORCHRUN=str(BIN / "torchrun"), FAIRSEQ_TRAIN=str(FAULT_TRAIN))

    killed = launch(launcher, tmp_path, MASTER_PORT=str(free_port()), MOE_FAULT_KILL="1:3", **env)
    assert killed.returncode != 0 and killed.seconds_after_fault is not None, killed.output[-3000:]
    print(f"job ended {killed.seconds_after_fault:.1f} s after rank 1 was killed")
    assert killed.seconds_after_fault < EXIT_BOUND
    assert "--collective-timeout 600" in (save / "train.log").read_text()  # the launcher's default
    assert "collective timeout: 600 s" in killed.output  # ... and it reached the process group
    # The last complete checkpoint is update 2's, and it is exactly the uninterrupted run's.
    assert updates(save / "checkpoint_last.pt") == 2
    assert_same_training_state(save / "checkpoint_last.pt", reference / "checkpoint_1_2.pt")

    resumed = launch(launcher, tmp_path, MASTER_PORT=str(free_port()), **env)  # the same command again
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert re.search(r"Loaded checkpoint \S*checkpoint_last\.pt \(epoch 1 @ 2 updates\)", resumed.output)
    assert_same_training_state(save / "checkpoint_last.pt", reference / "checkpoint_last.pt")
    assert updates(save / "checkpoint_last.pt") == MAX_UPDATE
    assert_clean(save)


def test_a_finished_run_continued_elsewhere_to_more_updates_is_the_longer_run(data, reference, tmp_path):
    """scripts/run_emulated_study.sh CONTINUE_TO: a run that ended at its --max-update (2), continued
    in another directory from its checkpoint_last.pt (--restore-file, the expert shards read
    beside it) to a higher --max-update, ends in exactly the uninterrupted longer run's state."""
    short, longer = tmp_path / "short", tmp_path / "continued"
    run(torchrun_cmd(train_cmd(data, short, *FLAGS, max_update=2)))
    assert_same_training_state(short / "checkpoint_last.pt", reference / "checkpoint_1_2.pt")
    cmd = train_cmd(data, longer, *FLAGS, "--restore-file", short / "checkpoint_last.pt", max_update=MAX_UPDATE)
    out = launch(torchrun_cmd(cmd), tmp_path)
    assert out.returncode == 0, out.output[-3000:]
    assert re.search(r"Loaded checkpoint \S*short/checkpoint_last\.pt \(epoch 1 @ 2 updates\)", out.output)
    assert_same_training_state(longer / "checkpoint_last.pt", reference / "checkpoint_last.pt")
    assert updates(short / "checkpoint_last.pt") == 2  # the run continued is left as it was


def dense_cmd(data, save, *extra, max_update):
    """fairseq's own task and dense transformer, data-parallel with the plugin loaded (fairseq
    cannot train on CPU under torchrun without it): the study's plain fairseq anchor, tiny."""
    return [cli("fairseq-train"), data, "--user-dir", USER_DIR, "--task", "translation_multi_simple_epoch",
            "--lang-pairs", lang_pairs(), "--encoder-langtok", "src", "--decoder-langtok", "--arch", "transformer",
            "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
            "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
            "--decoder-attention-heads", "2", "--share-all-embeddings", "--criterion", "label_smoothed_cross_entropy",
            "--label-smoothing", "0.1", "--optimizer", "adam", "--lr", "0.002", "--max-tokens", "800",
            "--max-update", str(max_update), "--save-dir", save, "--cpu", "--num-workers", "0", "--seed", "3",
            "--log-format", "simple", "--no-progress-bar", "--no-epoch-checkpoints", "--disable-validation", *extra]


def test_a_data_parallel_dense_run_resumes_on_every_rank(data, tmp_path):
    """Without expert parallelism fairseq resumes with rank 0 reading the checkpoint and
    broadcasting it; the other ranks' torch.load (weights_only under torch >= 2.6) refused the
    DictConfig in it and died, so no data-parallel job could resume (fairseq_patches, patch 15).
    Here plain fairseq's dense transformer on 2 ranks stops at update 2 and is continued in
    another directory to update 4, as scripts/run_emulated_study.sh CONTINUE_TO does."""
    short, longer = tmp_path / "short", tmp_path / "continued"
    run(torchrun_cmd(dense_cmd(data, short, max_update=2)))
    out = launch(torchrun_cmd(dense_cmd(data, longer, "--restore-file", short / "checkpoint_last.pt", max_update=4)),
                 tmp_path)
    assert out.returncode == 0, out.output[-3000:]
    assert re.search(r"Loaded checkpoint \S*short/checkpoint_last\.pt \(epoch 1 @ 2 updates\)", out.output)
    assert torch.load(longer / "checkpoint_last.pt", weights_only=False)["optimizer_history"][-1]["num_updates"] == 4


def test_hung_rank_ends_the_job_within_the_collective_timeout(data, tmp_path):
    """Rank 1 hangs inside an all-to-all without dying: torchrun sees nothing wrong, and rank 0
    would wait torch's 30 min.  --collective-timeout 10 ends it.  (fairseq's --heartbeat-timeout
    ends this hang only because the hung rank still runs Python and interrupts itself; it does
    not end a frozen rank (SIGSTOP), while the collective timeout does: docs/benchmarks.md.)"""
    save = tmp_path / "hung"
    hung = launch(fault_cmd(data, save, "--collective-timeout", "10"), tmp_path, MOE_FAULT_STALL="1:3")
    assert hung.returncode != 0 and hung.seconds_after_fault is not None, hung.output[-3000:]
    print(f"job ended {hung.seconds_after_fault:.1f} s after rank 1 hung")
    # rank 0 may have entered the all-to-all a little before rank 1 stamped the time: not
    # exactly >= 10, but clearly a wait for the timeout, not an immediate failure
    assert 5 <= hung.seconds_after_fault < 10 + EXIT_BOUND
    assert re.search(r"[Tt]imed out", hung.output), hung.output[-3000:]
    assert updates(save / "checkpoint_last.pt") == 2
    full_state(save / "checkpoint_last.pt")  # complete and loadable


def test_full_disk_while_saving_keeps_the_last_checkpoint_and_the_next_save_succeeds(data, reference, tmp_path):
    """Rank 1's shard of update 4 fails half-way with ENOSPC (after 4 kB): the job ends,
    checkpoint_last.pt still points to the complete update-2 set, no temporary file is left,
    and the relaunch saves again (updates 4 and 6) and ends where the uninterrupted run did."""
    save = tmp_path / "full"
    failed = launch(fault_cmd(data, save), tmp_path, MOE_FAULT_SAVE="1:2:4096")
    assert failed.returncode != 0 and "No space left on device" in failed.output, failed.output[-3000:]
    assert updates(save / "checkpoint_last.pt") == 2
    assert_same_training_state(save / "checkpoint_last.pt", reference / "checkpoint_1_2.pt")
    assert not [p for p in save.rglob("*") if ".tmp" in p.name]

    resumed = launch(fault_cmd(data, save), tmp_path)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert re.search(r"Loaded checkpoint \S*checkpoint_last\.pt \(epoch 1 @ 2 updates\)", resumed.output)
    assert_same_training_state(save / "checkpoint_last.pt", reference / "checkpoint_last.pt")
    assert_clean(save)  # the half-written update-4 set was replaced, nothing else accumulated


def test_resuming_from_a_truncated_shard_is_refused_in_one_line(data, reference, tmp_path):
    """fairseq-train on 2 ranks resuming from a checkpoint whose rank-1 shard was cut short:
    rank 1 refuses in one line naming the file, and the job ends (rank 0 is stopped by torchrun)."""
    import shutil

    save = tmp_path / "damaged"
    shutil.copytree(reference, save)
    shard = next((save / SHARD_ROOT / torch.load(save / "checkpoint_last.pt")[POINTER]["tag"]).glob("rank-1-*"))
    shard.write_bytes(shard.read_bytes()[:5000])
    proc = launch(torchrun_cmd(train_cmd(data, save, *FLAGS, max_update=MAX_UPDATE + 2)), tmp_path)
    assert proc.returncode != 0
    assert f"moe_fairseq: error: checkpoint shard {shard} cannot be read, it is truncated or corrupt (" \
        in proc.output, proc.output[-3000:]
    assert "MoEUsageError" not in proc.output


def test_ranks_given_different_expert_counts_are_refused_at_start_up(data, tmp_path):
    proc = launch(fault_cmd(data, tmp_path / "mixed"), tmp_path, MOE_FAULT_ARGS="1:--moe-expert-count 8")
    assert proc.returncode != 0
    line = ("moe_fairseq: error: ranks disagree on --moe-expert-count: rank 0 has 4, rank 1 has 8; "
            "every rank must be given the same flags")
    assert proc.output.count(line) == 2, proc.output[-3000:]  # both ranks, one line each
    assert "size mismatch" not in proc.output and "MoEUsageError" not in proc.output  # no traceback


AGREE = r'''
import sys, torch.distributed as dist
from argparse import Namespace
from moe_fairseq.distributed.agreement import check_ranks_agree
from moe_fairseq.moe.errors import MoEUsageError
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
for flag, value in (("none", ""), ("moe_expert_count", 8), ("moe_gating_dropout", 0.1), ("seed", 4)):
    args = Namespace(moe_expert_count=4, moe_gating_dropout=0.3, seed=3, arch="transformer_moe_tiny")
    if rank == 1 and flag != "none":
        setattr(args, flag, value)
    try:
        check_ranks_agree(args)
        print("agreed")
    except MoEUsageError as e:
        print(e)
'''


def test_check_ranks_agree_names_the_flag_on_every_rank(tmp_path):
    """2 gloo processes, each check once with equal flags, then with one flag changed on rank 1."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    port = str(free_port())
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([str(BIN / "python"), str(script), str(r), port], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    expected = ["agreed",
                "ranks disagree on --moe-expert-count: rank 0 has 4, rank 1 has 8",
                "ranks disagree on --moe-gating-dropout: rank 0 has 0.3, rank 1 has 0.1",
                "ranks disagree on --seed: rank 0 has 3, rank 1 has 4"]
    for out, err in outs:
        lines = out.strip().splitlines()
        assert len(lines) == 4 and all(line.startswith(e) for line, e in zip(lines, expected)), (out, err[-2000:])


def test_first_disagreement_reports_the_first_differing_flag_in_order():
    from argparse import Namespace

    base = Namespace(moe_expert_count=4, moe_gating_dropout=0.3, seed=3)
    other = Namespace(moe_expert_count=4, moe_gating_dropout=0.2, seed=5)
    values = [agreed_flag_values(base), agreed_flag_values(base), agreed_flag_values(other)]
    flags = [flag for flag, _ in values[0]]
    assert "--moe-expert-count" in flags and "--seed" in flags and "--moe-eval-top-k" in flags
    assert first_disagreement(values) == ("--moe-gating-dropout", {0: "0.3", 1: "0.3", 2: "0.2"})
    assert first_disagreement(values[:2]) is None
    # a rank whose moe_fairseq knows a flag the others do not
    assert first_disagreement([values[0], values[0] + [("--moe-new", "1")]]) == \
        ("--moe-new", {0: "(no such flag)", 1: "1"})
