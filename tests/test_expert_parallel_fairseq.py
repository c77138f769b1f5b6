"""Expert parallelism through the real CLI: 2 CPU processes (gloo) under torchrun.

Proves the ranks form one job (world size 2, distinct ranks, tokens crossing the all-to-all),
that a SIGKILLed run resumes from complete shards at the saved update, that a sharded
checkpoint, its consolidation and the expert-parallel model give the same outputs, and that
resharding 2 -> 1 and 1 -> 2 moves every expert's weights and Adam moments exactly, after which
training continues exactly as the uninterrupted run.
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import moe_fairseq.plugin  # noqa: F401  (allowlists the types fairseq checkpoints hold for torch.load)

from cli_helpers import (BIN, DETERMINISTIC_MOE, USER_DIR, cli, descendants, free_port, generate_cmd, hypotheses,
                         last_value, make_tiny_corpus, run, torchrun_cmd, train_cmd)

MOE = ["--moe-expert-count", "4", "--moe-router", "top2", "--moe-gating-dropout", "0.3", "--dropout", "0.0"]


def saved_updates(path):
    return torch.load(path)["optimizer_history"][-1]["num_updates"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("ep_corpus"))


@pytest.fixture(scope="module")
def sharded_run(data, tmp_path_factory):
    save = tmp_path_factory.mktemp("ep_run")
    proc = run(torchrun_cmd(train_cmd(data, save, *MOE, "--save-interval-updates", "4", max_update=12)))
    return save, proc.stdout + proc.stderr


def test_two_processes_form_one_expert_parallel_job(sharded_run):
    save, log = sharded_run
    assert "distributed init (rank 0)" in log and "distributed init (rank 1)" in log
    assert "'distributed_world_size': 2" in log
    # Each rank holds 2 of the 4 experts per MoE layer (2 layers x 4 tensors), and tokens
    # crossed the all-to-all (0 bytes in a single process).
    shard0 = torch.load(next(save.glob("moe_shards/*/rank-0-of-2.pt")))
    assert all(t.shape[0] == 2 for t in shard0["model"].values()) and len(shard0["model"]) == 8
    assert max(float(v) for v in re.findall(r"moe_a2a_mb=([0-9.]+)", log)) > 0
    # only one process wrote fairseq's files; each rank wrote its own shard
    last = torch.load(save / "checkpoint_last.pt")
    assert not any(".moe.experts." in k for k in last["model"]), "experts must live in the shards only"
    tag = last["moe_shards"]["tag"]
    assert sorted(p.name for p in (save / "moe_shards" / tag).iterdir()) == ["rank-0-of-2.pt", "rank-1-of-2.pt"]


def test_sigkill_mid_training_then_resume_at_saved_update(data, tmp_path):
    save = tmp_path / "killed"
    cmd = torchrun_cmd(train_cmd(data, save, *MOE, "--save-interval-updates", "3", max_update=400))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            time.sleep(1)
            if (save / "checkpoint_last.pt").exists():
                try:
                    if saved_updates(save / "checkpoint_last.pt") >= 9:
                        break
                except Exception:
                    pass
        else:
            pytest.fail("no checkpoint after 300 s")
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:  # the launcher and both ranks, mid-training
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    time.sleep(1)
    assert not descendants(proc.pid)
    saved = saved_updates(save / "checkpoint_last.pt")
    assert saved < 400
    resumed = run(torchrun_cmd(train_cmd(data, save, *MOE, "--save-interval-updates", "3", max_update=saved + 4)))
    log = resumed.stdout + resumed.stderr
    assert re.search(rf"Loaded checkpoint \S*checkpoint_last\.pt \(epoch \d+ @ {saved} updates\)", log), log[-3000:]
    assert last_value(log, "num_updates") == saved + 4
    # garbage collection kept exactly the shard sets that checkpoints point to
    pointed = {torch.load(p)["moe_shards"]["tag"] for p in save.glob("checkpoint*.pt")}
    assert {p.name for p in (save / "moe_shards").iterdir()} == pointed


def test_consolidated_checkpoint_generates_like_the_sharded_one(data, sharded_run, tmp_path):
    save, _ = sharded_run
    consolidated = tmp_path / "model.pt"
    run([cli("moe-consolidate"), save / "checkpoint_last.pt", consolidated])
    state = torch.load(consolidated)
    assert "moe_shards" not in state
    assert all(v.shape[0] == 4 for k, v in state["model"].items() if ".moe.experts." in k)
    # An independent reference for the merge: the shard files read as plain torch files (no
    # plugin, no resolver), each rank's local experts stacked in rank order.
    pointer = torch.load(save / "checkpoint_last.pt", weights_only=False)["moe_shards"]
    shards = [torch.load(save / pointer["dir"] / name, weights_only=False)
              for name in sorted(os.listdir(save / pointer["dir"]))]
    assert len(shards) == 2
    experts = [k for k in state["model"] if ".moe.experts." in k]
    assert experts
    for k in experts:
        assert torch.equal(state["model"][k], torch.cat([sh["model"][k] for sh in shards])), k
    sharded = hypotheses(run(generate_cmd(data, save / "checkpoint_last.pt")).stdout)
    single = hypotheses(run(generate_cmd(data, consolidated)).stdout)
    assert len(single) == 40 and single == sharded


EP_FORWARD = r'''
import sys, torch, torch.distributed as dist
import moe_fairseq.plugin  # registers the plugin and its checkpoint hooks
from fairseq import checkpoint_utils
ckpt, data, out = sys.argv[1:4]
if len(sys.argv) > 4:
    dist.init_process_group("gloo")
models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([ckpt], arg_overrides={"data": data})
model = models[0].eval()
torch.manual_seed(0)
src = torch.randint(4, 40, (3, 7)); prev = torch.randint(4, 40, (3, 5))
with torch.no_grad():
    logits = model(src, torch.full((3,), 7), prev)[0]
if not dist.is_initialized() or dist.get_rank() == 0:
    torch.save(logits, out)
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
'''


def test_expert_parallel_model_equals_consolidated_model(data, sharded_run, tmp_path):
    save, _ = sharded_run
    script = tmp_path / "ep_forward.py"
    script.write_text(EP_FORWARD)
    consolidated = tmp_path / "model.pt"
    run([cli("moe-consolidate"), save / "checkpoint_last.pt", consolidated])
    run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), script,
         save / "checkpoint_last.pt", data, tmp_path / "ep.pt", "dist"])
    run([sys.executable, script, consolidated, data, tmp_path / "single.pt"])
    ep, single = torch.load(tmp_path / "ep.pt"), torch.load(tmp_path / "single.pt")
    assert torch.allclose(ep, single, atol=1e-5), (ep - single).abs().max()


# Resharding, checked for values.  A corpus of 24 sentences per direction in batches of 8: an
# epoch is 6 batches, 3 updates on 1 process (--update-freq 2) or on 2 ranks.  Stopping at the end
# of an epoch keeps the data order of the uninterrupted run on either world size (resharding
# inside an epoch moves to the next one: tools/reshard.py).  No random draw anywhere
# (DETERMINISTIC_MOE): 1 and 2 ranks train alike (test_expert_parallel_equivalence.py).
ONE_PROCESS = ["--update-freq", "2"]
# The gradient of a key projection's bias is zero up to rounding (softmax ignores it); Adam's
# default eps 1e-8 would turn that rounding noise, which differs between 1 and 2 ranks, into
# steps of up to 1e-2 * lr.  1e-6 keeps them below the comparison's tolerance.
RESHARD_RUN = [*DETERMINISTIC_MOE, "--adam-eps", "1e-6"]
ADAM_SLOTS = ("exp_avg", "exp_avg_sq")


@pytest.fixture(scope="module")
def epoch_data(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("reshard_corpus"), n_train=24)


@pytest.fixture(scope="module")
def uninterrupted(epoch_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("uninterrupted")
    log = run(train_cmd(epoch_data, save, *RESHARD_RUN, *ONE_PROCESS, max_update=6))
    assert re.search(r"end of epoch 1 \(average epoch stats below\)", log.stdout + log.stderr)
    assert "epoch 002" in log.stdout + log.stderr
    return consolidated_state(save / "checkpoint_last.pt", save / "consolidated.pt")


def consolidated_state(checkpoint, out):
    run([cli("moe-consolidate"), checkpoint, out])
    return torch.load(out)


def slots_by_name(state):
    """{parameter name: optimizer entry} of a single-file (consolidated) checkpoint."""
    return {n: state["last_optimizer_state"]["state"][i] for i, n in enumerate(state["moe_param_names"])}


def shard_files(save_dir, world):
    pointer = torch.load(save_dir / "checkpoint_last.pt")["moe_shards"]
    assert pointer["world_size"] == world
    return [torch.load(save_dir / "moe_shards" / pointer["tag"] / f"rank-{r}-of-{world}.pt") for r in range(world)]


def assert_same_run(state, reference, what):
    """The model and Adam's state of a resharded-and-continued run against the uninterrupted one:
    equal up to float summation order (1 vs 2 ranks)."""
    assert state["optimizer_history"][-1]["num_updates"] == reference["optimizer_history"][-1]["num_updates"]
    assert state["model"].keys() == reference["model"].keys()
    for name, value in reference["model"].items():
        err = (state["model"][name] - value).abs().max().item()
        assert err < 2e-5, f"{what}: {name} differs from the uninterrupted run by {err:.3g}"
    got, ref = slots_by_name(state), slots_by_name(reference)
    for name, entry in ref.items():
        assert int(got[name]["step"]) == int(entry["step"]), name
        for slot in ADAM_SLOTS:
            assert torch.allclose(got[name][slot], entry[slot], rtol=1e-3, atol=1e-9), f"{what}: {name} {slot}"


def test_reshard_one_to_two_then_training_equals_the_uninterrupted_run(epoch_data, uninterrupted, tmp_path):
    single = tmp_path / "single"
    run(train_cmd(epoch_data, single, *RESHARD_RUN, *ONE_PROCESS, max_update=3))
    source = torch.load(single / "checkpoint_last.pt")
    two = tmp_path / "two"
    run([cli("moe-reshard"), single / "checkpoint_last.pt", two, "--world-size", "2"])
    # Right after resharding, each rank's shard holds exactly its experts' weights and Adam moments.
    src = slots_by_name(source)
    shards = shard_files(two, 2)
    experts = [n for n in source["model"] if ".moe.experts." in n]
    assert len(experts) == 8
    for rank, shard in enumerate(shards):
        assert sorted(shard["model"]) == sorted(experts) == sorted(shard["optimizer"])
        mine = slice(2 * rank, 2 * rank + 2)
        for name in experts:
            assert torch.equal(shard["model"][name], source["model"][name][mine]), name
            assert int(shard["optimizer"][name]["step"]) == int(src[name]["step"]) == 3
            for slot in ADAM_SLOTS:
                assert torch.equal(shard["optimizer"][name][slot], src[name][slot][mine]), (name, slot)
                assert shard["optimizer"][name][slot].abs().max() > 0, (name, slot)
    shared = torch.load(two / "checkpoint_last.pt")
    assert not any(".moe.experts." in k for k in shared["model"])
    kept = shared["last_optimizer_state"]["state"]  # the shared parameters' Adam state, unchanged
    for i, name in enumerate(source["moe_param_names"]):
        assert (i in kept) == (name not in experts), name
        if i in kept:
            assert all(torch.equal(kept[i][slot], src[name][slot]) for slot in ADAM_SLOTS), name
    proc = run(torchrun_cmd(train_cmd(epoch_data, two, *RESHARD_RUN, max_update=6)))
    log = proc.stdout + proc.stderr
    assert re.search(r"Loaded checkpoint .*\(epoch \d+ @ 3 updates\)", log), log[-3000:]
    continued = consolidated_state(two / "checkpoint_last.pt", tmp_path / "continued.pt")
    assert_same_run(continued, uninterrupted, "1 -> 2")


def test_reshard_two_to_one_then_training_equals_the_uninterrupted_run(epoch_data, uninterrupted, tmp_path):
    two = tmp_path / "two"
    run(torchrun_cmd(train_cmd(epoch_data, two, *RESHARD_RUN, max_update=3)))
    one = tmp_path / "one"
    run([cli("moe-reshard"), two / "checkpoint_last.pt", one, "--world-size", "1"])
    # Right after resharding, the single shard holds both ranks' experts and Adam moments, in order.
    sources = shard_files(two, 2)
    (merged,) = shard_files(one, 1)
    assert sorted(merged["optimizer"]) == sorted(merged["model"]) == sorted(sources[0]["model"])
    for name in merged["model"]:
        assert torch.equal(merged["model"][name], torch.cat([s["model"][name] for s in sources]))
        assert int(merged["optimizer"][name]["step"]) == int(sources[1]["optimizer"][name]["step"]) == 3
        for slot in ADAM_SLOTS:
            expected = torch.cat([s["optimizer"][name][slot] for s in sources])
            assert torch.equal(merged["optimizer"][name][slot], expected), (name, slot)
    proc = run(train_cmd(epoch_data, one, *RESHARD_RUN, *ONE_PROCESS, max_update=6))
    log = proc.stdout + proc.stderr
    assert re.search(r"Loaded checkpoint .*\(epoch \d+ @ 3 updates\)", log), log[-3000:]
    continued = consolidated_state(one / "checkpoint_last.pt", tmp_path / "continued.pt")
    assert_same_run(continued, uninterrupted, "2 -> 1")


def test_expert_count_the_world_cannot_hold_is_refused(data, tmp_path):
    proc = run(torchrun_cmd(train_cmd(data, tmp_path, "--moe-expert-count", "3", max_update=1)), check=False)
    assert proc.returncode != 0
    assert "--moe-expert-count=3 cannot be sharded over a world size of 2" in proc.stderr + proc.stdout


def test_validation_bleu_with_expert_parallelism_keeps_ranks_in_step(data, tmp_path):
    """--eval-bleu on 2 ranks: each rank decodes its own validation batches (small batches, so
    the ranks' batches differ, and so do their numbers of decoder steps, each an all-to-all in
    every MoE decoder layer).  Without the ranks kept in step the collectives pair up wrongly
    and the job hangs (here: fails at the 60 s collective timeout)."""
    cmd = train_cmd(data, tmp_path / "bleu", *MOE, "--eval-bleu", "--eval-bleu-remove-bpe", "none",
                    "--eval-bleu-args", '{"beam": 2, "max_len_a": 1, "max_len_b": 2}', "--batch-size-valid", "4",
                    "--validate-interval-updates", "2", "--collective-timeout", "60", "--no-save", max_update=4)
    proc = run(torchrun_cmd(cmd), timeout=300)
    log = proc.stdout + proc.stderr
    assert len(re.findall(r"valid on 'valid' subset", log)) == 2, log[-3000:]
    assert "done training" in log
