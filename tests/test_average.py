"""moe-average: the averaged checkpoint is the element-wise mean of its inputs (brute force),
whatever their layout (consolidated, sharded by any world size, mixed), and it generates."""
import subprocess
import sys

import pytest
import torch

from cli_helpers import REPO, cli, generate_cmd, hypotheses, make_tiny_corpus, run, train_cmd
from moe_fairseq.tools import average
from moe_fairseq.tools.reshard import reshard
from moe_fairseq.moe.errors import MoEUsageError

UPDATES = (2, 4, 6)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    """SMoE-Dropout (frozen random router buffer, split experts): a checkpoint every 2 updates."""
    save = tmp_path_factory.mktemp("smoe")
    run(train_cmd(data, save, "--moe-router", "random", "--moe-split-ffn", "--moe-top-k-schedule-steps", "4",
                  "--save-interval-updates", "2", max_update=max(UPDATES)))
    return save


def ckpt(run_dir, update):
    return run_dir / f"checkpoint_1_{update}.pt"


def brute_force_mean(paths):
    models = [torch.load(p)["model"] for p in paths]
    return {name: torch.stack([m[name].double() for m in models]).mean(0).to(models[0][name].dtype)
            for name in models[0]}, models


def test_every_tensor_is_the_mean_experts_and_frozen_router_included(run_dir, tmp_path):
    paths = [ckpt(run_dir, u) for u in UPDATES]
    out = tmp_path / "avg.pt"
    average.main(["--inputs", *map(str, paths), "--output", str(out)])
    got = torch.load(out)
    want, models = brute_force_mean(paths)
    assert sorted(got["model"]) == sorted(want)
    for name, tensor in got["model"].items():
        assert tensor.dtype == want[name].dtype
        torch.testing.assert_close(tensor, want[name], rtol=1e-6, atol=1e-7, msg=name)
    experts = [n for n in want if ".moe.experts." in n]
    routers = [n for n in want if n.endswith("moe.router.weight")]
    assert len(experts) == 8 and len(routers) == 2
    # the inputs differ where training changed them (else the test could not fail) ...
    for name in experts + ["encoder.layers.0.fc1.weight"]:
        assert not torch.equal(models[0][name], models[-1][name]), name
    # ... and the frozen router is identical in every input, so its mean is itself, bit for bit
    for name in routers:
        assert all(torch.equal(m[name], got["model"][name]) for m in models)
    assert got["last_optimizer_state"] is None and "moe_shards" not in got
    assert got["moe_averaged"]["inputs"] == [str(p) for p in paths]
    assert got["cfg"]["model"].moe_expert_count == 4  # the first input's args


def test_sharded_and_consolidated_inputs_give_the_same_average(run_dir, tmp_path):
    consolidated = [ckpt(run_dir, u) for u in UPDATES]
    mixed = [consolidated[0],
             reshard(str(consolidated[1]), str(tmp_path / "w2"), world_size=2),
             reshard(str(consolidated[2]), str(tmp_path / "w4"), world_size=4)]
    assert "moe_shards" in torch.load(mixed[1]) and "moe_shards" in torch.load(mixed[2])
    average.main(["--inputs", *map(str, consolidated), "--output", str(tmp_path / "a.pt")])
    average.main(["--inputs", *map(str, mixed), "--output", str(tmp_path / "b.pt")])
    a, b = torch.load(tmp_path / "a.pt")["model"], torch.load(tmp_path / "b.pt")["model"]
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_last_n_update_checkpoints_as_fairseqs_script(run_dir, tmp_path):
    picked = average.main(["--inputs", str(run_dir), "--num-update-checkpoints", "2",
                           "--output", str(tmp_path / "last2.pt")])
    assert picked == [str(ckpt(run_dir, 6)), str(ckpt(run_dir, 4))]  # newest first: the newest is the template
    bounded = average.main(["--inputs", str(run_dir), "--num-update-checkpoints", "2", "--checkpoint-upper-bound",
                            "4", "--output", str(tmp_path / "upto4.pt")])
    assert bounded == [str(ckpt(run_dir, 4)), str(ckpt(run_dir, 2))]
    want, _ = brute_force_mean([ckpt(run_dir, 6), ckpt(run_dir, 4)])
    got = torch.load(tmp_path / "last2.pt")["model"]
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)


def test_the_average_generates(data, run_dir, tmp_path):
    """moe-average by its console-script name; the average loads and generates."""
    out = tmp_path / "avg.pt"
    run([cli("moe-average"), "--inputs", *[ckpt(run_dir, u) for u in UPDATES], "--output", out])
    assert out.is_file()
    proc = run(generate_cmd(data, out))
    assert sorted(hypotheses(proc.stdout)) == list(range(40))


def test_incompatible_inputs_are_refused(run_dir, tmp_path):
    state = torch.load(ckpt(run_dir, 2))
    name = next(n for n in state["model"] if n.endswith("moe.router.weight"))
    state["model"][name] = state["model"][name] + 1
    torch.save(state, tmp_path / "other_run.pt")
    with pytest.raises(MoEUsageError, match="frozen random router .* differs .* different runs"):
        average.main(["--inputs", str(ckpt(run_dir, 4)), str(tmp_path / "other_run.pt"), "--output",
                      str(tmp_path / "x.pt")])
    state = torch.load(ckpt(run_dir, 2))
    state["model"]["encoder.layers.0.fc1.weight"] = state["model"]["encoder.layers.0.fc1.weight"][:3]
    torch.save(state, tmp_path / "other_shape.pt")
    with pytest.raises(MoEUsageError, match="encoder.layers.0.fc1.weight has shape"):
        average.main(["--inputs", str(ckpt(run_dir, 4)), str(tmp_path / "other_shape.pt"), "--output",
                      str(tmp_path / "x.pt")])
    with pytest.raises(MoEUsageError, match="found only 3"):
        average.main(["--inputs", str(run_dir), "--num-update-checkpoints", "5", "--output", str(tmp_path / "x.pt")])
    with pytest.raises(MoEUsageError, match="is one of the inputs"):
        average.main(["--inputs", str(ckpt(run_dir, 2)), str(ckpt(run_dir, 4)), "--output", str(ckpt(run_dir, 4))])
    assert not (tmp_path / "x.pt").exists()


def test_a_failed_run_leaves_the_old_output_and_no_temporary_file(run_dir, tmp_path):
    out = tmp_path / "avg.pt"
    out.write_bytes(b"old")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "moe_fairseq.tools.average", "--inputs",
                           str(ckpt(run_dir, 2)), str(tmp_path / "broken.pt"), "--output", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"moe-average: error: --inputs: {tmp_path / 'broken.pt'} cannot be read as a checkpoint")
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avg.pt", "broken.pt"]
