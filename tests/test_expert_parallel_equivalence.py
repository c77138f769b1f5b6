"""Whole-run equivalence: one fairseq-train update with expert parallelism on 2 gloo ranks equals
the same update on 1 process over the same global batch (pytorch_ddp and legacy_ddp).

Why the batches are the same: fairseq shuffles one list of batches per epoch with the seed and
gives rank r the batches r, r + W, ... (EpochBatchIterator + ShardedIterator); one process with
--update-freq 2 takes batches 0 and 1 into its first update, the two ranks take one each.  The
loss is a sum over tokens divided by the global sample size either way, and every random draw
is off (dropout 0, top-2 with a deterministic second expert, no jitter, no gating dropout).

SGD with momentum: after one step the momentum buffer *is* the gradient the step used, so the
optimizer state compares the gradients themselves (Adam's first step, m / sqrt(v), would hide
any scale error such as a wrong expert-gradient divisor), and the parameters moved by lr x that
gradient.  The 2-rank checkpoint is consolidated with moe-consolidate before the comparison.
"""
import re

import pytest
import torch

import moe_fairseq.plugin  # noqa: F401  (allowlists the types fairseq checkpoints hold for torch.load)

from cli_helpers import DETERMINISTIC_MOE, cli, make_tiny_corpus, run, torchrun_cmd, train_cmd

SGD = ["--optimizer", "sgd", "--momentum", "0.9", "--lr", "1.0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("eq_corpus"), n_train=64)


def by_name(state):
    """{parameter name: (value, gradient of the last step)} from a single-file checkpoint."""
    names = state["moe_param_names"]
    slots = state["last_optimizer_state"]["state"]
    assert len(slots) == len(names)
    return {n: (state["model"][n], slots[i]["momentum_buffer"]) for i, n in enumerate(names)}


def train_loss(log):
    return float(re.search(r"\| train \| epoch 001 \| loss ([0-9.]+)", log).group(1))


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    save = tmp_path_factory.mktemp("eq_w1")
    proc = run(train_cmd(data, save, *DETERMINISTIC_MOE, *SGD, "--update-freq", "2", max_update=1))
    return torch.load(save / "checkpoint_last.pt"), proc.stdout + proc.stderr


@pytest.mark.parametrize("backend", ["pytorch_ddp", "legacy_ddp"])
def test_two_ranks_update_equals_one_process(data, one_process, tmp_path, backend):
    proc = run(torchrun_cmd(train_cmd(data, tmp_path / "w2", *DETERMINISTIC_MOE, *SGD, "--ddp-backend", backend,
                                      max_update=1)))
    log = proc.stdout + proc.stderr
    assert "'distributed_world_size': 2" in log and f"'ddp_backend': '{backend}'" in log
    assert max(float(v) for v in re.findall(r"moe_a2a_mb=([0-9.]+)", log)) > 0  # tokens crossed ranks
    consolidated = tmp_path / "consolidated.pt"
    run([cli("moe-consolidate"), tmp_path / "w2" / "checkpoint_last.pt", consolidated])
    single, single_log = one_process
    # the same tokens: the logged (global) training loss agrees
    assert train_loss(log) == pytest.approx(train_loss(single_log), abs=2e-3)
    a, b = by_name(single), by_name(torch.load(consolidated))
    assert a.keys() == b.keys()
    experts = [n for n in a if ".moe.experts." in n]
    assert len(experts) == 8  # 2 MoE layers x (w1, b1, w2, b2), every expert in one tensor again
    for name, (value, grad) in a.items():
        value2, grad2 = b[name]
        assert value2.shape == value.shape, name
        scale = grad.abs().max().item()
        err = (grad2 - grad).abs().max().item()
        assert err <= 1e-4 * scale + 1e-8, f"{name}: gradient differs by {err:.3g} (max |grad| {scale:.3g})"
        err = (value2 - value).abs().max().item()
        assert err <= 1e-4 * scale + 1e-7, f"{name}: parameter differs by {err:.3g} after the update"
    for name in experts:  # every expert took part: a test on untouched experts would prove nothing
        grad = a[name][1]
        assert all(grad[e].abs().max() > 1e-5 for e in range(4)), f"{name}: an expert got no gradient"
