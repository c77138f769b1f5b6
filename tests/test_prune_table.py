"""moe_fairseq.experiments.prune_table (scripts/prune_table.py) on a tiny trained top-2 model (E = 4, directions en-de and en-fr).

References are independent of the script's counting: parameters are those of the model fairseq
builds from each pruned checkpoint (model.parameters(), which counts tied embeddings once), the
all-directions count is that of a checkpoint actually pruned to the union of the kept experts,
BLEU is moe-evaluate's on the same checkpoint, and N = E must score what the original scores.
"""
import json
import os

import pytest
import torch

from cli_helpers import hypotheses, make_tiny_corpus, run, train_cmd
from moe_fairseq.tools.prune import prune_state, router_changes
from moe_fairseq.checkpoint.sharded import atomic_save
from moe_fairseq.tools.expert_usage import load_model
from moe_fairseq.experiments import prune_table as pt
from moe_fairseq.moe.errors import MoEUsageError

pytestmark = pytest.mark.usefixtures("one_thread")


E = 4
MD = "# results\n\nbefore\n\n" + pt.BEGIN + "\nold table\n" + pt.END + "\n\nafter\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_table")
    data = make_tiny_corpus(root)
    save = root / "top2"
    run(train_cmd(data, save, "--moe-router", "top2", "--moe-dropless", max_update=12))
    return data, save / "checkpoint_last.pt", root


def argv(data, ckpt, work, *extra):
    return [str(ckpt), "--data", str(data), "--raw-dir", str(data.parent / "raw"), "--work", str(work),
            "--lang-pairs", "en-de,en-fr", "--keeps", f"{E},1", "--beam", "1", "--batch-size", "20", *extra]


@pytest.fixture(scope="module")
def real_run(setup, tmp_path_factory):
    """One run with the real moe-evaluate (4 fairseq-generate calls)."""
    data, ckpt, _ = setup
    out = tmp_path_factory.mktemp("run")
    (out / "results.md").write_text(MD)
    table = pt.main(argv(data, ckpt, out / "work", "--json", str(out / "t.json"), "--results-md",
                         str(out / "results.md"), "--png", str(out / "t.png"),
                         "--slimmable", str(out / "absent.json")), log=lambda *_: None)
    return table, out


def model_parameters(path, data):
    model, _ = load_model(str(path), str(data))
    params = dict(model.named_parameters())  # each shared parameter once
    return sum(p.numel() for p in params.values()), sum(p.numel() for n, p in params.items() if ".moe.experts." in n)


def test_parameters_and_sizes_are_those_of_the_pruned_models(setup, real_run):
    data, ckpt, _ = setup
    table, out = real_run
    pruned = out / "work" / "pruned"
    assert table["keeps"] == [E, 1] and len(table["rows"]) == 4
    original_total, _ = model_parameters(ckpt, data)
    assert table["original_params"]["total"] == original_total
    for row in table["rows"]:
        path = pruned / row["checkpoint"]
        assert row["checkpoint"] == f"{row['direction'].split('-')[1]}.keep{row['keep']}.pt"
        assert (row["params_direction"], row["params_experts"]) == model_parameters(path, data)
        assert row["file_bytes"] == os.path.getsize(path)
        if row["keep"] == E:
            assert row["params_direction"] == original_total == row["params_all_directions"]
    # E -> 1 removes three of four experts' weights (and router rows) in every layer
    full = {r["direction"]: r for r in table["rows"] if r["keep"] == E}
    one = {r["direction"]: r for r in table["rows"] if r["keep"] == 1}
    assert one["en-de"]["params_experts"] * E == full["en-de"]["params_experts"]

    # all directions at N = 1: a checkpoint pruned to the union of what de and fr keep, counted by fairseq
    report = json.loads((pruned / "usage.target.keep1.json").read_text())
    union = {p: sorted(set(report["groups"]["de"]["layers"][p]["kept"]) | set(report["groups"]["fr"]["layers"][p]["kept"]))
             for p in report["groups"]["de"]["layers"]}
    model, _ = load_model(str(ckpt), str(data))
    want = 0
    for name, p in dict(model.named_parameters()).items():
        layer = next((l for l in union if name.startswith(l + ".")), None)
        want += p.numel() if layer is None else p.numel() // E * len(union[layer])
    assert one["en-de"]["params_all_directions"] == one["en-fr"]["params_all_directions"] == want
    if len({len(ids) for ids in union.values()}) == 1:  # a checkpoint has one N for every layer
        state, n = torch.load(ckpt, weights_only=False), len(next(iter(union.values())))
        atomic_save(prune_state(state, union, router_changes(state, n), {}), str(out / "union.pt"))
        assert model_parameters(out / "union.pt", data)[0] == want


def test_bleu_is_moe_evaluates_and_keeping_every_expert_scores_the_original(setup, real_run):
    from moe_fairseq.tools.evaluate import main as evaluate

    data, ckpt, _ = setup
    table, out = real_run
    for row in table["rows"]:
        saved = json.loads((out / "work" / "eval" / f"{row['direction']}.keep{row['keep']}" / "results.json").read_text())
        assert row["bleu"] == saved[0]["bleu"] and row["signature"].startswith("nrefs:1|")
    original = evaluate(["--path", str(ckpt), "--lang-pairs", "en-de", "--raw-dir", str(data.parent / "raw"), "--split",
                         "test", "--beam", "1", "--batch-size", "20", "--cpu", "--out", str(out / "original"), str(data)])
    assert next(r for r in table["rows"] if r["keep"] == E and r["direction"] == "en-de")["bleu"] == original[0]["bleu"]
    # the tiny model's BLEU is near 0, so compare what was generated: N = E is the original model
    want = hypotheses((out / "original" / "generate.test.en-de.txt").read_text())
    got = hypotheses((out / "work" / "eval" / f"en-de.keep{E}" / "generate.test.en-de.txt").read_text())
    assert len(want) == 40 and got == want


def test_outputs_json_markdown_section_and_png(real_run):
    table, out = real_run
    assert json.loads((out / "t.json").read_text())["rows"] == table["rows"]
    md = (out / "results.md").read_text()
    assert md.startswith("# results\n\nbefore\n\n" + pt.BEGIN) and md.endswith(pt.END + "\n\nafter\n")
    assert "old table" not in md
    for row in table["rows"]:
        assert f"| {row['direction']} | {row['keep']} | " in md and f"{row['bleu']:.2f}" in md
    assert "*Pending*" in md and "absent.json" in md  # the slimmable slot, marked
    assert (out / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_skips_finished_pieces_and_redoes_only_a_missing_one(setup, real_run, monkeypatch):
    data, ckpt, _ = setup
    table, out = real_run

    def no_prune(*a, **k):
        raise AssertionError("pruned again")

    monkeypatch.setattr("moe_fairseq.tools.prune.prune", no_prune)
    calls = []

    def fake_evaluate(path, pair, eval_out):
        calls.append((os.path.basename(path), pair))
        return {"direction": pair, "bleu": 12.34, "sentences": 40, "missing": 0, "signature": "nrefs:1|fake"}

    again = pt.main(argv(data, ckpt, out / "work"), evaluate=fake_evaluate, log=lambda *_: None)
    assert calls == [] and again["rows"] == table["rows"]
    (out / "work" / "eval" / "en-fr.keep1.json").unlink()
    partial = pt.main(argv(data, ckpt, out / "work", "--partial"), evaluate=fake_evaluate, log=lambda *_: None)
    assert calls == [] and [r["bleu"] for r in partial["rows"] if (r["direction"], r["keep"]) == ("en-fr", 1)] == [None]
    assert "| en-fr | 1 | " in pt.markdown(partial, None, None, None) and "*pending*" in pt.markdown(partial, None, None, None)
    redone = pt.main(argv(data, ckpt, out / "work"), evaluate=fake_evaluate, log=lambda *_: None)
    assert calls == [("fr.keep1.pt", "en-fr")]
    assert [r["bleu"] for r in redone["rows"] if (r["direction"], r["keep"]) == ("en-fr", 1)] == [12.34]
    assert json.loads((out / "work" / "eval" / "en-fr.keep1.json").read_text())["bleu"] == 12.34


def test_render_only_adds_the_slimmable_curve_when_it_exists(real_run, tmp_path):
    table, out = real_run
    slim = {"checkpoint": "smoe/checkpoint_last.pt", "router": "random", "experts": 4, "ks": [1, 2, 4],
            "directions": ["en-de", "en-fr"], "split": "test", "beam": 5, "signature": "nrefs:1|x",
            "bleu": {"1": {"en-de": 10.0, "en-fr": 20.0}, "2": {"en-de": 11.0, "en-fr": 21.5},
                     "4": {"en-de": 11.5, "en-fr": 22.0}}}
    (tmp_path / "slimmable.json").write_text(json.dumps(slim))
    (tmp_path / "r.md").write_text(MD)
    pt.main(["--render-only", "--json", str(out / "t.json"), "--slimmable", str(tmp_path / "slimmable.json"),
             "--results-md", str(tmp_path / "r.md"), "--png", str(tmp_path / "p.png")], log=lambda *_: None)
    md = (tmp_path / "r.md").read_text()
    assert "| k | en-de | en-fr | mean |" in md and "| 2 | 11.00 | 21.50 | 16.25 |" in md
    assert "*Pending*" not in md
    assert (tmp_path / "p.png").exists()


@pytest.mark.parametrize("extra,message", [
    (["--keeps", "5"], "--keeps must lie between 1 and the checkpoint's --moe-expert-count=4 (got 5)"),
    (["--keeps", "two"], "--keeps must be comma-separated integers"),
    (["--lang-pairs", "en_de"], "--lang-pairs must be directions like en-de"),
])
def test_bad_input_is_one_line_before_any_work(setup, tmp_path, capsys, extra, message):
    data, ckpt, _ = setup
    with pytest.raises(SystemExit) as e:
        pt.main(argv(data, ckpt, tmp_path / "w") + extra, log=lambda *_: None)
    assert str(e.value).startswith("prune_table: error: ") and message in str(e.value)
    assert not (tmp_path / "w").exists()


def test_results_md_without_markers_is_refused_before_any_work(setup, tmp_path):
    data, ckpt, _ = setup
    (tmp_path / "r.md").write_text("# no markers\n")
    with pytest.raises(SystemExit, match="has no .*prune:begin"):
        pt.main(argv(data, ckpt, tmp_path / "w", "--results-md", str(tmp_path / "r.md")), log=lambda *_: None)
    assert not (tmp_path / "w").exists()


def test_default_keeps_and_parameter_counting_by_storage():
    assert pt.default_keeps(8) == [8, 4, 2, 1]
    assert pt.default_keeps(16) == [16, 8, 4, 2, 1]
    assert pt.default_keeps(2) == [2, 1]
    emb = torch.zeros(10, 3)
    state = {"encoder.embed_tokens.weight": emb, "decoder.embed_tokens.weight": emb,
             "decoder.output_projection.weight": emb, "encoder.embed_positions._float_tensor": torch.zeros(1),
             "encoder.version": torch.tensor([3.0]), "encoder.layers.0.fc1.moe.experts.w1": torch.zeros(4, 3, 5),
             "encoder.layers.0.fc1.moe.router.wg.weight": torch.zeros(4, 3), "x.count": torch.zeros(7, dtype=torch.long)}
    assert pt.count_parameters(state) == {"total": 30 + 60 + 12, "experts": 60, "router": 12, "shared": 30}
    with pytest.raises(MoEUsageError, match="--keeps must lie between 1 and"):
        pt.parse_keeps("0,2", 4)
    assert pt.parse_keeps("1,4,2,4", 4) == [4, 2, 1]


def test_pieces_locked_by_a_live_process_are_waited_for_and_stale_locks_taken_over(tmp_path):
    """Copies of the command started side by side share the pieces (one lock file per piece)."""
    import subprocess
    import sys
    import threading

    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        (eval_dir / ".en-de.keep2.lock").write_text(str(sleeper.pid))  # another copy is evaluating it
        (eval_dir / ".en-fr.keep2.lock").write_text(str(dead.pid))  # left by a process that died
        row = {"direction": "en-de", "bleu": 7.0, "sentences": 40, "missing": 0, "signature": "s"}
        timer = threading.Timer(0.3, lambda: pt.atomic_write_json(eval_dir / "en-de.keep2.json", row))
        timer.start()
        calls = []

        def fake(path, pair, out):
            calls.append(pair)
            return {"direction": pair, "bleu": 1.0, "sentences": 40, "missing": 0, "signature": "s"}

        got = pt.evaluate_step(["en-de", "en-fr"], [2], tmp_path, eval_dir, fake, log=lambda *_: None, jobs=2,
                               poll=0.05)
        timer.join()
    finally:
        sleeper.kill()
    assert calls == ["en-fr"]  # en-de was the live process's; en-fr's lock was stale
    assert got[2]["en-de"]["bleu"] == 7.0 and got[2]["en-fr"]["bleu"] == 1.0
    # this process removed its own lock; the other process's is its own to remove
    assert sorted(p.name for p in eval_dir.iterdir()) == [".en-de.keep2.lock", "en-de.keep2.json", "en-fr.keep2.json"]
    assert pt.claim(eval_dir / ".x.lock") and not pt.claim(eval_dir / ".x.lock")  # held by this live process
