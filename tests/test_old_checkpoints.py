"""Checkpoints written before the tools moved still load, through the tools as they are now.

tests/fixtures/checkpoint_v1 was written by the earlier code (see make_checkpoint_v1.py there):
a tiny MoE model's expert-sharded checkpoint from 2 ranks, its consolidation (one file, no
optimizer state), and a fixed batch's log-probabilities under that model.  The references here
are independent of the tools under test: the shard files read as plain torch files, and the
numbers the earlier code computed.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import REPO

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "checkpoint_v1"
SHARDED = FIXTURE / "checkpoint_last.pt"
CONSOLIDATED = FIXTURE / "consolidated.pt"
E, W = 4, 2


def plain(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def expert_keys(model):
    return sorted(k for k in model if ".moe.experts." in k)


@pytest.fixture(scope="module")
def shards():
    pointer = plain(SHARDED)["moe_shards"]
    return [plain(FIXTURE / pointer["dir"] / f"rank-{r}-of-{W}.pt") for r in range(W)]


def merged_by_hand(shards, key):
    """An expert tensor of the whole model: the ranks' local experts stacked in rank order."""
    return torch.cat([shard["model"][key] for shard in shards])


def test_the_fixture_is_what_it_claims():
    main = plain(SHARDED)
    assert main["moe_shards"]["version"] == 1 and main["moe_shards"]["world_size"] == W
    assert not expert_keys(main["model"]) and len(expert_keys(plain(CONSOLIDATED)["model"])) == 8


def test_consolidating_the_old_sharded_checkpoint_gives_the_old_consolidated_one(tmp_path, shards):
    from moe_fairseq.tools.consolidate import consolidate

    state = consolidate(str(SHARDED), str(tmp_path / "model.pt"), keep_optimizer=False)
    old = plain(CONSOLIDATED)
    assert sorted(state["model"]) == sorted(old["model"])
    for key, tensor in old["model"].items():
        assert torch.equal(state["model"][key], tensor), key
    for key in expert_keys(old["model"]):
        assert state["model"][key].shape[0] == E
        assert torch.equal(state["model"][key], merged_by_hand(shards, key)), key


def test_the_old_checkpoint_reshards_with_its_optimizer_state(tmp_path, shards):
    """2 -> 4 ranks and back into one file: every expert weight and Adam moment where it was."""
    from moe_fairseq.tools.consolidate import consolidate
    from moe_fairseq.tools.reshard import reshard

    four = reshard(str(SHARDED), str(tmp_path / "four"), 4)
    state = consolidate(four, str(tmp_path / "model.pt"))
    names = state["moe_param_names"]
    for key in expert_keys(state["model"]):
        assert torch.equal(state["model"][key], merged_by_hand(shards, key)), key
        moments = state["last_optimizer_state"]["state"][names.index(key)]
        for moment in ("exp_avg", "exp_avg_sq"):
            expected = torch.cat([shard["optimizer"][key][moment] for shard in shards])
            assert torch.equal(moments[moment], expected), (key, moment)


def test_averaging_an_old_checkpoint_with_itself_gives_it_back(tmp_path):
    from moe_fairseq.tools.average import average_checkpoints

    state = average_checkpoints([str(SHARDED), str(CONSOLIDATED)])
    for key, tensor in plain(CONSOLIDATED)["model"].items():
        assert torch.equal(state["model"][key], tensor), key


def test_the_old_checkpoints_give_the_old_numbers(tmp_path):
    """Loaded into fairseq's model by the plugin, sharded and consolidated alike."""
    from moe_fairseq.tools.expert_usage import load_model

    reference = torch.load(FIXTURE / "reference.pt")
    for path in (SHARDED, CONSOLIDATED):
        model, _ = load_model(path, str(FIXTURE / "data"))
        with torch.no_grad():
            out, _ = model(reference["src_tokens"], reference["src_lengths"], reference["prev_output_tokens"])
            lprobs = model.get_normalized_probs((out, None), log_probs=True)
        torch.testing.assert_close(lprobs, reference["lprobs"], rtol=0, atol=1e-6, msg=str(path))


OFFLINE_TOOLS = r"""
import sys, tempfile
hook = sys.excepthook
from pathlib import Path
from moe_fairseq.tools import average, consolidate, reshard
from moe_fairseq.checkpoint.saved_args import read_saved_args
from moe_fairseq.tools.evaluate import training_task_args
sharded, consolidated = sys.argv[1:3]
out = Path(tempfile.mkdtemp())
consolidate.cli_main([sharded, str(out / "model.pt")])
reshard.cli_main([sharded, str(out / "four"), "--world-size", "4"])
average.cli_main(["--inputs", sharded, consolidated, "--output", str(out / "avg.pt")])
print(training_task_args(read_saved_args(sharded).task))
assert "fairseq" not in sys.modules, "an offline tool imported fairseq"
assert sys.excepthook is hook, "an offline tool installed the plugin's excepthook"
"""


def test_offline_tools_read_old_checkpoints_without_fairseq_or_its_patches():
    proc = subprocess.run([sys.executable, "-c", OFFLINE_TOOLS, str(SHARDED), str(CONSOLIDATED)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(
        ["--task", "translation_multi_moe", "--encoder-langtok", "src", "--decoder-langtok", "--langs", "de,en"])


def test_the_saved_arguments_of_old_checkpoints():
    """The one reader of saved arguments, on both files: their copies (cfg's model and task)
    as fairseq 0.12 wrote them, read and changed in every copy."""
    from moe_fairseq.checkpoint.saved_args import as_list, saved_args

    for path in (SHARDED, CONSOLIDATED):
        state = plain(path)
        saved = saved_args(state)
        assert saved.model is state["cfg"]["model"] and saved.task is state["cfg"]["task"]
        assert (saved.num_experts, saved.router, saved.get("moe_freq")) == (E, "top2", 1)
        assert as_list(saved.get("lang_pairs")) == ["en-de"] and saved.get("no_such_arg", 7) == 7
        saved.set(moe_expert_count=2, moe_router="top1")
        for copy in (state["cfg"]["model"], state["cfg"]["task"]):
            assert (copy.moe_expert_count, copy.moe_router) == (2, "top1")
        assert saved_args(state).num_experts == 2


@pytest.mark.parametrize("argv,router", [([], "top2"), (["--moe-router", "noisy_topk"], "noisy_topk"),
                                         (["--moe-top1-expert"], "top1"),
                                         (["--moe-top1-expert", "--moe-router", "top2"], "top1")])
def test_the_saved_router_is_the_one_the_flags_build(argv, router):
    """SavedArgs.router resolves --moe-top1-expert as the flags do (moe.config.ALIASES)."""
    import argparse

    from moe_fairseq.checkpoint.saved_args import saved_args
    from moe_fairseq.models.moe_args import add_moe_args, moe_config_from_args, set_moe_defaults

    parser = argparse.ArgumentParser()
    add_moe_args(parser)
    args = parser.parse_args(["--moe-expert-count", "4", *argv])
    set_moe_defaults(args)
    assert moe_config_from_args(args).router == router
    assert saved_args({"model": {}, "cfg": {"model": args, "task": args}}).router == router
