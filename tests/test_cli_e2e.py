"""End-to-end: fairseq-train / fairseq-generate as subprocesses with --user-dir moe_fairseq."""
import json
import math
import re
import shutil

import pytest
import torch

import moe_fairseq.plugin  # noqa: F401  (allowlists the types fairseq checkpoints hold for torch.load)

from cli_helpers import cli, generate_cmd, hypotheses, last_value, make_tiny_corpus, run, train_cmd



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained_top2(data, tmp_path_factory):
    save = tmp_path_factory.mktemp("top2")
    proc = run(train_cmd(data, save, "--moe-router", "top2", "--moe-gating-dropout", "0.3", max_update=60))
    (save / "train.log").write_text(proc.stdout + proc.stderr)
    return save / "checkpoint_last.pt"


ROUTER_RUNS = {
    "top1": ["--moe-router", "top1", "--moe-z-loss-wt", "0.001", "--moe-jitter-eps", "0.01"],
    "top2": ["--moe-router", "top2", "--moe-second-expert-policy", "random"],
    "noisy_topk": ["--moe-router", "noisy_topk", "--moe-top-k", "2"],
    "random": ["--moe-router", "random", "--moe-top-k-min", "1", "--moe-top-k-max", "4",
               "--moe-top-k-schedule-steps", "8", "--moe-split-ffn"],
    "gate_drop": ["--moe-router", "top2", "--moe-gating-dropout", "0.5", "--moe-gating-dropout-mode", "gate_drop"],
    "gate_expert_drop": ["--moe-router", "top1", "--moe-gating-dropout", "0.5",
                         "--moe-gating-dropout-mode", "gate_expert_drop"],
    "local_topk": ["--moe-router", "top2", "--moe-gating-dropout", "0.5", "--moe-gating-dropout-mode", "local_topk"],
}


@pytest.mark.parametrize("name", sorted(ROUTER_RUNS))
def test_each_router_trains_and_writes_a_checkpoint(data, tmp_path, name):
    proc = run(train_cmd(data, tmp_path, *ROUTER_RUNS[name], max_update=10))
    log = proc.stdout + proc.stderr
    assert last_value(log, "num_updates") == 10
    assert (tmp_path / "checkpoint_last.pt").exists()
    state = torch.load(tmp_path / "checkpoint_last.pt")  # weights_only default: the allowlist works
    keys = state["model"].keys()
    assert any(".moe.experts.w1" in k for k in keys), "no MoE layer in the checkpoint"
    if name == "random":
        assert any(k.endswith("moe.router.weight") for k in keys), "the frozen router must be saved"
    if name in ("gate_drop", "gate_expert_drop", "local_topk"):
        dropped = [float(v) for v in re.findall(r"moe_gating_dropped=([0-9.]+)", log)]
        assert dropped and 0 < max(dropped), "gating dropout never fired at p=0.5"
    if name == "noisy_topk":
        assert "moe_importance_loss" in log and "moe_load_loss" in log


def test_gating_dropout_decisions_follow_the_rate(data, tmp_path):
    proc = run(train_cmd(data, tmp_path, "--moe-router", "top2", "--moe-gating-dropout", "0.3", max_update=60))
    dropped = [float(v) for v in re.findall(r"moe_gating_dropped=([0-9.]+)", proc.stdout + proc.stderr)]
    # 60 updates x 2 MoE layers, one log per update: mean fraction near 0.3 (binomial sd ~0.04)
    assert len(dropped) >= 55
    assert 0.15 < sum(dropped) / len(dropped) < 0.45


def load(checkpoint, data):
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)], arg_overrides={"data": str(data)})
    return models[0], task


def test_smoe_dropout_k_schedule_reaches_k_max(data, tmp_path):
    """SMoE-Dropout: k grows 1 -> 4 over 8 updates; the trained model's routers follow that
    schedule (read from the checkpoint, counted in the slots they request) and evaluate with
    every expert (k = E) by default."""
    run(train_cmd(data, tmp_path, *ROUTER_RUNS["random"], max_update=10))
    from moe_fairseq.moe.collect import moe_layers

    state = torch.load(tmp_path / "checkpoint_last.pt")
    assert state["optimizer_history"][-1]["num_updates"] == 10  # past the schedule's 8 steps
    # parameter-matched experts (--moe-split-ffn): hidden size FFN / E = 128 / 4
    w1 = next(v for k, v in state["model"].items() if k.endswith("moe.experts.w1"))
    assert tuple(w1.shape) == (4, 64, 32)
    model, _ = load(tmp_path / "checkpoint_last.pt", data)
    layers = moe_layers(model)
    assert len(layers) == 2
    x = torch.randn(6, 64)
    for layer in layers:
        layer.train()
        ks = []
        for t in (0, 2, 4, 6, 8, 10):  # round-half-up of 3 t / 8, plus 1, clipped
            layer.set_num_updates(t)
            layer(x)
            ks.append(float(layer.aux.stats.requested_slots) / float(layer.aux.stats.num_tokens))
        assert ks == [1, 2, 3, 3, 4, 4]
        layer.eval()
        layer(x, aux_mode="losses+stats")
        assert float(layer.aux.stats.requested_slots) == 4 * 6


def test_generate_beats_the_copy_baseline(data, trained_top2, tmp_path):
    """60 updates learn some of the toy task (word substitution + reversal): every sentence gets a
    hypothesis and BLEU (moe-evaluate, by its console-script name) is above copying the source,
    which shares no word with the reference (BLEU 0).  Plain tokens: no sentencepiece to remove."""
    hyps = hypotheses(run(generate_cmd(data, trained_top2)).stdout)
    assert len(hyps) == 40 and set(hyps) == set(range(40))
    assert all(h for _, h in hyps.values())
    out = tmp_path / "eval"
    run([cli("moe-evaluate"), data, "--path", trained_top2, "--lang-pairs", "en-de", "--raw-dir",
         data.parent / "raw", "--beam", "2", "--cpu", "--copy-baseline", "--out", out, "--", "--post-process", "none"])
    (row,) = json.loads((out / "results.json").read_text())
    assert row["missing"] == 0 and row["bleu_copy_source"] == 0.0
    assert row["bleu"] > 2.0, row
    # the score is sacrebleu's on the hypotheses aligned to the references by sentence id
    import sacrebleu

    text = (out / "generate.test.en-de.txt").read_text()
    by_id = {int(line.split("\t")[0][2:]): line.split("\t")[2] for line in text.splitlines() if line.startswith("H-")}
    refs = (data.parent / "raw" / "test.de").read_text().splitlines()
    assert row["bleu"] == pytest.approx(sacrebleu.corpus_bleu([by_id[i] for i in range(40)], [refs]).score, abs=0.006)


def label_smoothed_ce_by_hand(checkpoint, data, eps=0.1):
    """Validation loss of a checkpoint in bits per target token, recomputed outside the criterion:
    -sum_v q(v) log p(v) with q = 1 - eps on the target and eps / (V - 1) elsewhere, over the
    batches fairseq's validation forms (--max-tokens 800, multiple of 8; the evaluation capacity
    of a MoE layer depends on its batch)."""
    from fairseq import checkpoint_utils, utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)], arg_overrides={"data": str(data)})
    model = models[0].eval()
    task.load_dataset("valid")
    batches = task.get_batch_iterator(task.dataset("valid"), max_tokens=800, required_batch_size_multiple=8,
                                      max_positions=utils.resolve_max_positions(task.max_positions(),
                                                                                model.max_positions()))
    pad, total, tokens = task.target_dictionary.pad(), 0.0, 0
    with torch.no_grad():
        for sample in batches.next_epoch_itr(shuffle=False):
            lp = torch.log_softmax(model(**sample["net_input"])[0].double(), -1)
            target = sample["target"]
            q = torch.full_like(lp, eps / (lp.size(-1) - 1)).scatter_(-1, target.unsqueeze(-1), 1 - eps)
            keep = target != pad
            total += float(-(q * lp).sum(-1)[keep].sum())
            tokens += int(keep.sum())
    return total / tokens / math.log(2), tokens


def test_logged_validation_loss_is_plain_label_smoothed_cross_entropy(data, trained_top2):
    """The MoE run's `valid_loss` is the number a dense fairseq run would log: the label-smoothed
    CE in bits, without the MoE auxiliary loss (docs/statistics.md), which is logged apart."""
    log = (trained_top2.parent / "train.log").read_text()
    last = re.findall(r"valid on 'valid' subset \| loss ([0-9.]+) .*\| moe_loss ([0-9.]+) .*\| wpb ([0-9.]+)", log)[-1]
    logged, moe_loss, wpb = map(float, last)
    expected, tokens = label_smoothed_ce_by_hand(trained_top2, data)
    assert tokens == wpb  # the validation set is one batch: its words per batch are all its tokens
    assert moe_loss > 0.002  # large enough that including it would show at the logged precision
    assert logged == pytest.approx(expected, abs=1.5e-3), (logged, expected, moe_loss)


def test_resume_continues_at_saved_update_with_same_optimizer_state(data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--moe-router", "top2", "--moe-gating-dropout", "0.3", "--dropout", "0.0"]
    run(train_cmd(data, straight, *common, max_update=16))
    run(train_cmd(data, resumed, *common, max_update=8))
    first = torch.load(resumed / "checkpoint_last.pt")
    proc = run(train_cmd(data, resumed, *common, max_update=16))
    log = proc.stdout + proc.stderr
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 8 updates\)", log), log[-2000:]
    assert last_value(log, "num_updates") == 16
    a = torch.load(straight / "checkpoint_last.pt")
    b = torch.load(resumed / "checkpoint_last.pt")
    assert b["optimizer_history"][-1]["num_updates"] == 16
    # Adam's state continued from the saved one instead of restarting at zero: its step
    # counters (per parameter; a router skipped by gating dropout gets no step) match the
    # uninterrupted run's, and exceed what the first half alone reached.
    sa, sb = a["last_optimizer_state"]["state"], b["last_optimizer_state"]["state"]
    s_first = first["last_optimizer_state"]["state"]
    assert sa.keys() == sb.keys() == s_first.keys()
    for key in sa:
        assert int(sa[key]["step"]) == int(sb[key]["step"]) > int(s_first[key]["step"])
        assert torch.allclose(sa[key]["exp_avg_sq"], sb[key]["exp_avg_sq"], atol=1e-6)
    # Same data order, same seeds per update, same optimizer state: the resumed run ends
    # where the uninterrupted one does.
    for key, value in a["model"].items():
        assert torch.allclose(value, b["model"][key], atol=1e-5), key


def test_eval_top_k_override_changes_the_output(data, tmp_path):
    run(train_cmd(data, tmp_path, "--moe-router", "random", "--moe-top-k-min", "2", "--moe-top-k-max", "4",
                  "--moe-top-k-schedule", "fixed", max_update=30))
    ckpt = tmp_path / "checkpoint_last.pt"
    k1 = hypotheses(run(generate_cmd(data, ckpt, "--moe-eval-top-k", "1")).stdout)
    k4 = hypotheses(run(generate_cmd(data, ckpt, "--moe-eval-top-k", "4")).stdout)
    via_overrides = hypotheses(run(generate_cmd(data, ckpt, "--model-overrides", "{'moe_eval_top_k': 1}")).stdout)
    assert len(k1) == len(k4) == 40
    assert k1 != k4, "evaluating with 1 or 4 experts per token gave identical outputs"
    assert via_overrides == k1


def test_dense_model_is_exactly_fairseqs_transformer(data, tmp_path):
    """--moe-freq 0 with the MoE criterion is fairseq's transformer with its plain criterion: the
    same state dict (names and shapes), the same first logged loss at the same seed and, after
    one update, the same weights."""
    def first_loss(proc):
        return float(re.search(r"train_inner \|.*?\bloss=([0-9.]+)", proc.stdout + proc.stderr).group(1))

    dense = run(train_cmd(data, tmp_path / "a", "--moe-freq", "0", "--encoder-ffn-embed-dim", "128", max_update=1))
    cmd = train_cmd(data, tmp_path / "b", "--encoder-ffn-embed-dim", "128", max_update=1)
    cmd[cmd.index("transformer_moe_tiny")] = "transformer_tiny"
    cmd[cmd.index("moe_label_smoothed_cross_entropy")] = "label_smoothed_cross_entropy"
    ref = run(cmd)
    a, b = torch.load(tmp_path / "a" / "checkpoint_last.pt")["model"], torch.load(tmp_path / "b" / "checkpoint_last.pt")["model"]
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    assert first_loss(dense) == first_loss(ref)
    for key, value in b.items():
        assert torch.equal(a[key], value), key
    moe = run(train_cmd(data, tmp_path / "c", max_update=1))
    c = torch.load(tmp_path / "c" / "checkpoint_last.pt")["model"]
    assert sum(v.numel() for v in c.values()) > sum(v.numel() for v in b.values())


BAD_FLAGS = {
    "unknown router": (["--moe-router", "hash"], "--moe-router"),
    "k larger than experts": (["--moe-router", "noisy_topk", "--moe-top-k", "9"], "--moe-top-k"),
    "drop rate 1": (["--moe-gating-dropout", "1.0"], "--moe-gating-dropout"),
    "negative drop rate": (["--moe-gating-dropout=-0.1"], "--moe-gating-dropout"),
    "moe freq above layers": (["--moe-freq", "3"], "--moe-freq"),
    "k_min above k_max": (["--moe-router", "random", "--moe-top-k-min", "3", "--moe-top-k-max", "2"], "--moe-top-k-min"),
}


@pytest.mark.parametrize("name", sorted(BAD_FLAGS))
def test_bad_flags_give_one_line_errors(data, tmp_path, name):
    flags, expected = BAD_FLAGS[name]
    proc = run(train_cmd(data, tmp_path, *flags, max_update=1), check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and expected in error_lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "checkpoint_last.pt").exists()


def test_missing_language_pair_is_refused(data, tmp_path):
    proc = run(train_cmd(data, tmp_path, max_update=1, targets=("de", "cs")), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "en-cs" in proc.stderr and "--lang-pairs" in proc.stderr
