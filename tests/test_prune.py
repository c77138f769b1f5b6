"""moe-prune against brute force, on tiny trained models of every router.

The reference for a pruned model is the ORIGINAL model whose MoE layers are replaced by a
per-token loop over the kept experts only (router rows and expert weights indexed from the
original checkpoint by the kept ids the report records, the routing rule written out here):
so a wrong row, a wrong order, a wrong k or router in the saved args all change the logits.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli_helpers import REPO, cli, make_tiny_corpus, run, train_cmd
from moe_fairseq.tools import prune as prune_mod
from moe_fairseq.tools.prune import prune, select_experts
from moe_fairseq.tools.reshard import reshard
from moe_fairseq.tools.expert_usage import direction_batches, load_model
from moe_fairseq.moe.collect import moe_layers
from moe_fairseq.moe.errors import MoEUsageError

pytestmark = pytest.mark.usefixtures("one_thread")
E = 4
ROUTERS = {
    "top1": ["--moe-router", "top1", "--moe-dropless"],
    "top2": ["--moe-router", "top2", "--moe-dropless"],
    "noisy_topk": ["--moe-router", "noisy_topk", "--moe-top-k", "2"],
    "random": ["--moe-router", "random", "--moe-split-ffn", "--moe-top-k-schedule-steps", "4"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    dest = make_tiny_corpus(root)
    # validation data of a second direction into German (fr-de), to check --per target sums over sources
    raw = root / "raw"
    run([cli("fairseq-preprocess"), "--source-lang", "fr", "--target-lang", "de", "--validpref", raw / "valid",
         "--srcdict", raw / "dict.txt", "--tgtdict", raw / "dict.txt", "--destdir", dest, "--workers", "1"])
    return dest


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = {}
    for name, flags in ROUTERS.items():
        save = tmp_path_factory.mktemp(name)
        run(train_cmd(data, save, *flags, max_update=12))
        out[name] = save / "checkpoint_last.pt"
    return out


def logits(path, data, net_input):
    model, _ = load_model(path, str(data))
    with torch.no_grad():
        return model(**net_input)[0], model


def net_input_for(path, data, pair="en-de", sentences=16):
    """The first validation sentences of `pair`, batched as fairseq-generate would."""
    _, cfg = load_model(path, str(data))
    return direction_batches(cfg, str(data), [pair], "valid", sentences, sentences)[pair][0]["net_input"]


def test_the_tree_under_test_is_the_one_imported():
    import moe_fairseq
    from moe_fairseq.tools import evaluate

    assert Path(moe_fairseq.__file__).resolve().parent == REPO / "moe_fairseq"
    assert Path(evaluate.USER_DIR) == REPO / "moe_fairseq"  # what moe-evaluate passes to fairseq-generate


# ---------------------------------------------------------------- brute-force reference

def brute_force_layer(router_w, w1, b1, w2, b2, rule, k):
    """A MoE layer's forward written per token: route among the given experts only, then sum the
    gated expert FFNs (relu); padding rows get zeros, as in MoELayer."""

    def forward(x, padding_mask=None):
        flat = x.reshape(-1, x.shape[-1])
        pad = padding_mask.reshape(-1) if padding_mask is not None else torch.zeros(flat.shape[0], dtype=torch.bool)
        out = torch.zeros_like(flat)
        for s in range(flat.shape[0]):
            if pad[s]:
                continue
            logits = flat[s].float() @ router_w.float().t()
            if rule == "top1":
                p = torch.softmax(logits, -1)
                choices = [(int(p.argmax()), float(p.max()))]
            elif rule == "top2":
                p = torch.softmax(logits, -1)
                first = int(p.argmax())
                masked = p.clone()
                masked[first] = -1
                second = int(masked.argmax())
                total = float(p[first] + p[second])
                choices = [(first, float(p[first]) / total), (second, float(p[second]) / total)]
            else:  # top-k of the logits, softmax over the k chosen (noisy_topk in eval, random)
                values, index = logits.topk(k)
                choices = list(zip(index.tolist(), torch.softmax(values, -1).tolist()))
            for e, g in choices:
                out[s] += g * (F.relu(flat[s] @ w1[e] + b1[e]) @ w2[e] + b2[e])
        return out.view(x.shape)

    return forward


def router_rows(state, prefix):
    start = prefix + ".router."
    return {k[len(start):]: v for k, v in state.items() if k.startswith(start)}


def reference_logits(original_path, data, net_input, kept, rule, k):
    """The original model with each MoE layer replaced by brute force over its kept experts."""
    model, _ = load_model(original_path, str(data))
    state = model.state_dict()
    for name, module in model.named_modules():
        if name not in kept:
            continue
        ids = kept[name]
        pick = lambda t: torch.stack([t[e] for e in ids])  # noqa: E731
        rows = router_rows(state, name)
        # top1/top2: wg.weight; noisy_topk: w_gate (w_noise acts in training only); random: weight
        router_w = pick(next(rows[n] for n in ("wg.weight", "w_gate", "weight") if n in rows))
        w1, b1, w2, b2 = (pick(state[f"{name}.experts.{n}"]) for n in ("w1", "b1", "w2", "b2"))
        module.forward = brute_force_layer(router_w, w1, b1, w2, b2, rule, k)
    with torch.no_grad():
        return model(**net_input)[0]


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_keeping_every_expert_reproduces_the_original_exactly(router, data, trained, tmp_path):
    path = trained[router]
    report = prune(str(path), str(data), "en-de", E, str(tmp_path), per="pair", log=lambda *_: None)
    assert all(v["kept"] == [0, 1, 2, 3] for v in report["groups"]["en-de"]["layers"].values())
    net_input = net_input_for(path, data)
    original, _ = logits(path, data, net_input)
    pruned, _ = logits(tmp_path / f"en-de.keep{E}.pt", data, net_input)
    assert torch.equal(original, pruned)


# (router, N, rule of the pruned model, its k, --moe-eval-top-k while measuring)
PRUNED = [
    ("top1", 2, "top1", 1, None),  # top1's gate becomes the softmax over the kept experts
    ("top2", 2, "top2", 2, None),
    ("top2", 1, "top1", 1, None),  # documented fallback: top2 with one expert is top1 (gate 1)
    ("noisy_topk", 2, "topk", 2, None),
    ("noisy_topk", 1, "topk", 1, None),  # k = min(k, N)
    ("random", 2, "topk", 2, 1),  # k_max = E -> N; measured at k = 1 so the counts differ
]


@pytest.mark.parametrize("router,keep,rule,k,measure_k", PRUNED)
def test_pruned_model_equals_brute_force_over_the_kept_experts(router, keep, rule, k, measure_k, data, trained,
                                                              tmp_path):
    path = trained[router]
    report = prune(str(path), str(data), "en-de,en-fr", keep, str(tmp_path), per="target", eval_top_k=measure_k,
                   log=lambda *_: None)
    assert sorted(report["groups"]) == ["de", "fr"]
    layers = report["groups"]["de"]["layers"]
    kept = {prefix: info["kept"] for prefix, info in layers.items()}
    assert len(kept) == 2 and all(len(ids) == keep for ids in kept.values())
    pruned_path = tmp_path / f"de.keep{keep}.pt"

    net_input = net_input_for(path, data)
    got, model = logits(pruned_path, data, net_input)
    want = reference_logits(path, data, net_input, kept, rule, k)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the built model has N experts and the router / k the rule says
    for layer in moe_layers(model):
        assert layer.router.num_experts == keep and layer.experts.num_local == keep
        expected_router = {"top1": "Top1Router", "top2": "Top2Router"}.get(rule) or \
            {"noisy_topk": "NoisyTopKRouter", "random": "RandomRouter"}[router]
        assert type(layer.router).__name__ == expected_router
        if rule == "topk":
            assert layer.router.current_k() == k

    # the saved tensors are the original's rows in expert order, nothing else changed
    original = torch.load(path)["model"]
    saved = torch.load(pruned_path)
    for name, tensor in saved["model"].items():
        prefix = next((p for p in kept if name.startswith(p + ".")), None)
        if prefix is None:
            assert torch.equal(tensor, original[name]), name
        else:
            assert torch.equal(tensor, torch.stack([original[name][e] for e in kept[prefix]])), name
    if router == "random":
        assert any(n.endswith("router.weight") for n in saved["model"])
    if router == "noisy_topk":
        assert any(n.endswith("router.w_noise") for n in saved["model"])
    # saved args say N experts; no optimizer state; the selection is recorded
    for holder in (saved["cfg"]["model"], saved["cfg"]["task"]):
        assert holder.moe_expert_count == keep
    assert saved["last_optimizer_state"] is None
    assert saved["moe_pruned"]["kept"] == kept and saved["moe_pruned"]["directions"] == ["en-de"]


def test_selection_rule_is_top_n_by_share_ties_to_the_lower_id():
    assert select_experts([5, 9, 9, 1], 2) == [1, 2]
    assert select_experts([5, 9, 9, 1], 1) == [1]
    assert select_experts([3, 3, 3, 3], 2) == [0, 1]
    assert select_experts([0, 7, 2, 7, 1], 3) == [1, 2, 3]  # returned in expert order


def count_router_choices(path, data, pair):
    """Brute-force count: every expert index the routers return on all of `pair`'s valid data."""
    model, cfg = load_model(path, str(data))
    counts = {}
    for name, module in model.named_modules():
        if hasattr(module, "router") and hasattr(module, "experts"):
            counts[name] = torch.zeros(module.router.num_experts)

            def hook(mod, inputs, routing, name=name):
                counts[name] += torch.bincount(routing.expert_index[routing.keep].reshape(-1),
                                               minlength=counts[name].numel()).float()

            module.router.register_forward_hook(hook)
    with torch.no_grad():
        for b in direction_batches(cfg, str(data), [pair], "valid", None, 7)[pair]:
            model(**b["net_input"])
    return {name: c.tolist() for name, c in counts.items()}


def test_counts_are_the_routers_choices_and_per_target_sums_directions(data, trained, tmp_path):
    path = trained["top2"]
    by_pair = prune(str(path), str(data), "en-de,fr-de", 2, str(tmp_path / "pair"), per="pair",
                    log=lambda *_: None)
    by_target = prune(str(path), str(data), "en-de,fr-de", 2, str(tmp_path / "target"), per="target",
                      log=lambda *_: None)
    assert sorted(p.name for p in (tmp_path / "pair").iterdir()) == ["en-de.keep2.pt", "fr-de.keep2.pt",
                                                                     "usage.pair.keep2.json"]
    assert sorted(p.name for p in (tmp_path / "target").iterdir()) == ["de.keep2.pt", "usage.target.keep2.json"]
    for pair in ("en-de", "fr-de"):
        brute = count_router_choices(path, data, pair)
        for prefix, info in by_pair["groups"][pair]["layers"].items():
            assert info["counts"] == brute[prefix]
            assert sum(info["counts"]) > 0
    for prefix, info in by_target["groups"]["de"]["layers"].items():
        summed = [a + b for a, b in zip(by_pair["groups"]["en-de"]["layers"][prefix]["counts"],
                                        by_pair["groups"]["fr-de"]["layers"][prefix]["counts"])]
        assert info["counts"] == summed
        assert info["kept"] == select_experts(summed, 2)
    saved = json.loads((tmp_path / "target" / "usage.target.keep2.json").read_text())
    assert saved["groups"]["de"]["directions"] == ["en-de", "fr-de"]


def test_pruned_checkpoint_generates_and_moe_evaluate_scores_it(data, trained, tmp_path):
    """moe-prune and moe-evaluate by their console-script names.  12 updates translate nothing
    yet, so BLEU is checked for its value: sacrebleu on the hypotheses of the generate output
    (plain tokens: --post-process none) against the raw references, and the copy baseline."""
    import sacrebleu

    run([cli("moe-prune"), trained["top2"], "--data", data, "--lang-pairs", "en-de,en-fr", "--keep", "2",
         "--out", tmp_path])
    assert (tmp_path / "de.keep2.pt").is_file() and (tmp_path / "fr.keep2.pt").is_file()
    run([cli("moe-evaluate"), data, "--path", tmp_path / "de.keep2.pt", "--lang-pairs", "en-de", "--raw-dir",
         data.parent / "raw", "--split", "test", "--beam", "1", "--cpu", "--copy-baseline", "--out", tmp_path / "eval",
         "--", "--post-process", "none"])
    (row,) = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert row["direction"] == "en-de" and row["sentences"] == 40 and row["missing"] == 0
    text = (tmp_path / "eval" / "generate.test.en-de.txt").read_text()
    hyps = {int(line.split("\t")[0][2:]): line.split("\t")[2] for line in text.splitlines() if line.startswith("H-")}
    assert sorted(hyps) == list(range(40))
    raw = data.parent / "raw"
    refs = (raw / "test.de").read_text().splitlines()
    expected = sacrebleu.corpus_bleu([hyps[i] for i in range(40)], [refs]).score
    assert row["bleu"] == pytest.approx(expected, abs=0.006)
    copy = sacrebleu.corpus_bleu((raw / "test.en").read_text().splitlines(), [refs]).score
    assert row["bleu_copy_source"] == pytest.approx(copy, abs=0.006) and copy == 0.0  # no word in common


@pytest.mark.parametrize("keep,pairs,split,match", [
    (0, "en-de", "valid", "--keep must be between 1 and the checkpoint's --moe-expert-count=4 (got 0)"),
    (5, "en-de", "valid", "--keep must be between 1 and the checkpoint's --moe-expert-count=4 (got 5)"),
    (2, "en-de,fr-de", "test", "no 'test' data for --lang-pairs fr-de"),  # fr-de has valid data only
    (2, "en-xx", "valid", "the checkpoint knows no language xx"),
    (2, "en_de", "valid", "--lang-pairs must be directions like en-de"),
])
def test_bad_input_is_refused_before_anything_is_written(keep, pairs, split, match, data, trained, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MoEUsageError, match=match.replace("(", r"\(").replace(")", r"\)")):
        prune(str(trained["top2"]), str(data), pairs, keep, str(out), split=split, log=lambda *_: None)
    assert not out.exists() or not any(out.iterdir())


def test_a_sharded_checkpoint_is_refused_with_the_consolidate_hint(data, trained, tmp_path):
    sharded = reshard(str(trained["top2"]), str(tmp_path / "sharded"), world_size=2)
    with pytest.raises(MoEUsageError, match="expert-sharded .* run `moe-consolidate"):
        prune(sharded, str(data), "en-de", 2, str(tmp_path / "out"), log=lambda *_: None)


def test_the_cli_prints_one_line_and_leaves_nothing(data, trained, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "moe_fairseq.tools.prune", str(trained["top1"]),
                           "--data", str(data), "--lang-pairs", "en-de", "--keep", "9", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == \
        "moe-prune: error: --keep must be between 1 and the checkpoint's --moe-expert-count=4 (got 9)"
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_a_failed_write_leaves_no_file_and_keeps_the_old_ones(data, trained, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "de.keep2.pt").write_bytes(b"old")
    calls = []
    original_save = prune_mod.atomic_save

    def failing_save(obj, path):
        calls.append(path)
        if len(calls) == 2:  # the first file is complete, the second fails
            raise OSError("disk full")
        original_save(obj, path)

    monkeypatch.setattr(prune_mod, "atomic_save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        prune(str(trained["top2"]), str(data), "en-de,en-fr", 2, str(out), log=lambda *_: None)
    assert len(calls) == 2
    assert sorted(p.name for p in out.iterdir()) == ["de.keep2.pt"]  # no staging dir, no new file
    assert (out / "de.keep2.pt").read_bytes() == b"old"
