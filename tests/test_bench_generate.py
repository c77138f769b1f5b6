"""moe_fairseq.experiments.bench_generate (scripts/bench_generate.py) on tiny settings: the JSON
has every (model, batch, beam), fixed output lengths, the SMoE-Dropout k actually used, and
medians / ratios that match their raw values.  (The real timing run is not a test: it needs a quiet machine.)"""
import json
import statistics
import sys

import pytest

from cli_helpers import REPO, make_tiny_corpus, run, train_cmd
from moe_fairseq.experiments import bench_generate

TINY = ("--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32 --decoder-embed-dim 32 "
        "--encoder-attention-heads 2 --decoder-attention-heads 2")
SENTENCES, LENGTH, REPEATS = 5, 4, 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"))


def common(data, out):
    return ["--data", str(data), "--out", str(out), "--lang-pairs", "en-de,en-fr", "--sentences", str(SENTENCES),
            "--batch-sizes", "1,4", "--beams", "1,2", "--repeats", str(REPEATS), "--threads", "1",
            "--fixed-len", str(LENGTH)]


def test_configs_dense_twin_moe_and_smoe_ks(data, tmp_path):
    out = tmp_path / "bench.json"
    result = bench_generate.main(common(data, out) + ["--model-args", TINY, "--smoe-ks", "1,2,8"])
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(result["results"]))
    rows = {(r["model"], r["batch_sentences"], r["beam"]): r for r in saved["results"]}
    models = ["dense", "moe_top2", "smoe_dropout_k1", "smoe_dropout_k2", "smoe_dropout_k8"]
    assert sorted(rows) == sorted((m, b, beam) for m in models for b in (1, 4) for beam in (1, 2))
    described = {m["label"]: m for m in saved["meta"]["models"]}
    assert described["dense"]["experts"] == 0 and described["moe_top2"]["experts"] == 8
    assert described["moe_top2"]["router"] == "Top2Router"
    assert described["smoe_dropout_k1"]["router"] == "RandomRouter"
    for (model, b, beam), r in rows.items():
        assert r["sentences"] == SENTENCES
        assert r["tokens"] == SENTENCES * (LENGTH + 1)  # L tokens + end-of-sentence, whatever the model
        assert len(r["tokens_per_s_all"]) == len(r["seconds_all"]) == REPEATS
        assert r["tokens_per_s_all"] == pytest.approx([r["tokens"] / s for s in r["seconds_all"]])
        assert r["tokens_per_s_median"] == sorted(r["tokens_per_s_all"])[REPEATS // 2]
        ref = rows["dense", b, beam]["tokens_per_s_all"]
        paired = sorted(x / y for x, y in zip(r["tokens_per_s_all"], ref))[REPEATS // 2]
        assert r["ratio_to_reference_paired_median"] == pytest.approx(paired)
        assert r["ratio_to_reference_of_medians"] == pytest.approx(r["tokens_per_s_median"] / statistics.median(ref))
        want_k = {"dense": [], "moe_top2": [2]}[model] if "_k" not in model else [int(model.rsplit("_k", 1)[1])]
        assert r["eval_top_k_used"] == want_k
    assert saved["meta"]["fixed_len"] == LENGTH and saved["meta"]["repeats"] == REPEATS


def test_command_line_builds_the_plugin_configs_in_a_fresh_process(data, tmp_path):
    """In a fresh interpreter nothing has registered the plugin's task and model yet (in-process
    tests inherit them from earlier tests)."""
    out = tmp_path / "bench.json"
    run([sys.executable, "-W", "ignore", REPO / "scripts" / "bench_generate.py", *common(data, out),
         "--configs", "dense,smoe_dropout", "--smoe-ks", "1", "--batch-sizes", "1", "--beams", "1",
         "--repeats", "1", "--model-args", TINY], timeout=300)
    assert {r["model"] for r in json.loads(out.read_text())["results"]} == {"dense", "smoe_dropout_k1"}


def test_attribution_times_the_ffn_sublayers_of_dense_and_moe(data, tmp_path):
    out = tmp_path / "bench.json"
    result = bench_generate.main(common(data, out) + ["--model-args", TINY, "--configs", "dense,moe_top2", "--repeats", "1",
                                               "--batch-sizes", "2", "--beams", "1", "--attribute"])
    for row in result["results"]:
        a = row["attribution"]
        # 1 encoder and 1 decoder layer; 5 sentences in batches of 2 = 3 batches; L + 1 decoder steps each
        assert a["encoder_ffn_calls"] == 3 and a["decoder_ffn_calls"] == 3 * (LENGTH + 1)
        assert 0 < a["encoder_ffn_seconds"] + a["decoder_ffn_seconds"] < a["seconds"]
        assert a["ffn_ops_ms_per_call"] and all(ms >= 0 for ms in a["ffn_ops_ms_per_call"].values())
        # the whole pass per decoder step: 3 batches of L + 1 steps; weight GEMMs, other operators and
        # the time between operators add up to the step
        assert a["decoder_steps"] == 3 * (LENGTH + 1)
        assert a["step_gemm_ms"] > 0 and a["step_other_ops_ms"] > 0
        assert a["step_gemm_ms"] + a["step_other_ops_ms"] + a["step_between_ops_ms"] == pytest.approx(a["step_ms"])
    ops = {r["model"]: set(r["attribution"]["ffn_ops_ms_per_call"]) for r in result["results"]}
    assert "aten::linear" in ops["dense"] and ops["moe_top2"] != ops["dense"]


def test_trained_checkpoint_with_language_tokens(data, tmp_path):
    save = tmp_path / "smoe"
    run(train_cmd(data, save, "--moe-router", "random", "--moe-split-ffn", max_update=2))
    out = tmp_path / "bench.json"
    result = bench_generate.main(common(data, out) + ["--configs", "", "--reference", "",
                                               "--checkpoints", f"smoe={save / 'checkpoint_last.pt'}",
                                               "--smoe-ks", "1,4"])
    rows = result["results"]
    assert sorted({r["model"] for r in rows}) == ["smoe_k1", "smoe_k4"]
    # the decoder's language token is the forced first of the L tokens
    assert all(r["tokens"] == SENTENCES * (LENGTH + 1) for r in rows)
    assert all("ratio_to_reference_paired_median" not in r for r in rows)


def test_bad_options_are_one_line_errors(data, tmp_path):
    with pytest.raises(SystemExit, match="--smoe-ks: k = 16 exceeds the 8 experts of smoe_dropout"):
        bench_generate.main(common(data, tmp_path / "x.json") + ["--model-args", TINY, "--configs", "smoe_dropout",
                                                          "--reference", "", "--smoe-ks", "16"])
    with pytest.raises(SystemExit, match="--batch-sizes must be a comma-separated list"):
        bench_generate.main(common(data, tmp_path / "x.json") + ["--batch-sizes", "0"])
    assert not (tmp_path / "x.json").exists()


def test_decode_path_generates_what_the_general_path_generates(data, tmp_path, monkeypatch):
    """Beam search through a MoE model: the decoder-step path (moe/decode.py) and the general
    dispatch give the same hypotheses; --general-path times both in the same rounds."""
    import argparse

    import torch

    import moe_fairseq.moe.decode as decode
    from moe_fairseq.moe.collect import moe_layers

    b = bench_generate
    model, train_args = b.build_from_config("moe_top2", str(data), TINY.split(), "en-de,en-fr", 1)
    task = b.direction_task(argparse.Namespace(task=train_args), str(data), "en-de", "test")
    batches = b.sentence_batches(task.dataset("test"), SENTENCES, 2)
    calls = []
    real = decode.few_rows_ffn
    monkeypatch.setattr(decode, "few_rows_ffn", lambda *a, **k: calls.append(1) or real(*a, **k))
    hyps = {}
    for fast in (True, False):
        for layer in moe_layers(model):
            layer.decode_fast_path = fast
        generator = task.build_generator([model], argparse.Namespace(beam=3, max_len_a=0, max_len_b=12))
        with torch.no_grad():
            hyps[fast] = [[(h["tokens"].tolist(), round(float(h["score"]), 4)) for h in sent]
                          for batch in batches for sent in task.inference_step(generator, [model], batch)]
        if fast:
            assert calls, "the decode path never ran"
            n_fast = len(calls)
    assert len(calls) == n_fast  # switched off: never
    assert hyps[True] == hyps[False]

    out = tmp_path / "bench.json"
    b.main(["--data", str(data), "--out", str(out), "--lang-pairs", "en-de,en-fr", "--sentences", "2",
            "--batch-sizes", "1", "--beams", "1", "--repeats", "1", "--threads", "1", "--fixed-len", "3",
            "--configs", "dense,moe_top2", "--model-args", TINY, "--general-path"])
    saved = json.loads(out.read_text())
    assert sorted(r["model"] for r in saved["results"]) == ["dense", "moe_top2", "moe_top2_general"]
    assert saved["meta"]["general_path"] is True


def test_system_rows_of_fp32_and_int8_checkpoints(data, tmp_path):
    """--system-rows: one row per (checkpoint, batch, beam) with the paired ratio to --reference,
    BLEU per direction (moe-evaluate), file size and the memory of a fresh process; CPU seconds
    beside wall-clock in every round."""
    from moe_fairseq.tools.quantize import quantize

    save = tmp_path / "top2"
    run(train_cmd(data, save, "--moe-router", "top2", "--moe-dropless", max_update=2))
    fp32, int8 = save / "checkpoint_last.pt", tmp_path / "int8.pt"
    quantize(str(fp32), str(int8))
    out, rows_out = tmp_path / "bench.json", tmp_path / "rows.json"
    result = bench_generate.main(common(data, out) + [
        "--configs", "", "--checkpoints", f"moe_fp32={fp32},moe_int8={int8}", "--reference", "moe_fp32",
        "--repeats", "2", "--beams", "2", "--system-rows", str(rows_out), "--bleu-raw-dir", str(data.parent / "raw"),
        "--bleu-pairs", "en-de", "--rss"])
    rows = json.loads(rows_out.read_text())
    assert rows == result["systems"]
    assert [(r["system"], r["batch"], r["beam"]) for r in rows] == [
        ("moe_fp32", 1, 2), ("moe_int8", 1, 2), ("moe_fp32", 4, 2), ("moe_int8", 4, 2)]
    raw = {(r["model"], r["batch_sentences"]): r for r in result["results"]}
    for r in rows:
        assert {"system", "batch", "beam", "tokens_per_s", "ratio_to_moe_fp32", "bleu", "file_mb", "rss_mb"} <= set(r)
        timed = raw[r["system"], r["batch"]]
        assert r["tokens_per_s"] == round(statistics.median(timed["tokens_per_s_all"]), 1)
        assert r["ratio_to_moe_fp32"] == (1.0 if r["system"] == "moe_fp32" else
                                          round(timed["ratio_to_reference_paired_median"], 3))
        assert set(r["bleu"]) == {"en-de"} and 0 <= r["bleu"]["en-de"] <= 100
        path = fp32 if r["system"] == "moe_fp32" else int8
        assert r["file_mb"] == round(path.stat().st_size / 2 ** 20, 2)
        assert 0 < r["rss_mb"] <= r["peak_rss_mb"]
        assert len(timed["cpu_seconds_all"]) == 2 and all(0 < c for c in timed["cpu_seconds_all"])
        assert r["tokens_per_cpu_s"] == round(statistics.median(
            [timed["tokens"] / c for c in timed["cpu_seconds_all"]]), 1)
    assert len(result["meta"]["load_average_rounds"]) == 2
    with pytest.raises(SystemExit, match="--bleu-raw-dir and --rss go with --system-rows"):
        bench_generate.main(common(data, out) + ["--configs", "", "--checkpoints", f"a={fp32}", "--reference", "", "--rss"])
