"""moe-quantize end to end: a tiny trained MoE model and a plain fairseq transformer, quantized to
int8, load through the plugin in fairseq-generate, fairseq-interactive and moe-evaluate, translate
about as well as their fp32 checkpoints (sacrebleu), in under 40% of the fp32 file; bad inputs
are one-line errors; and the model-level swap (models/int8_inference.py) leaves no fp32 weight
matrix but the routers'."""
import json
import os
import subprocess
import sys

import pytest
import torch

import moe_fairseq.plugin  # noqa: F401  (registers the models; allowlists checkpoint types for torch.load)
from cli_helpers import REPO, USER_DIR, cli, generate_cmd, hypotheses, lang_pairs, make_tiny_corpus, run, train_cmd
from moe_fairseq.tools.consolidate import consolidate
from moe_fairseq.tools.reshard import reshard
from moe_fairseq.tools import quantize as quantize_tool

QUANTIZE = [sys.executable, "-c", "import sys; from moe_fairseq.console import quantize; "
            "sys.argv[0] = 'moe-quantize'; quantize()"]  # the console script's entry, on this checkout


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def moe(data, tmp_path_factory):
    """(fp32 checkpoint without optimizer state, its int8 twin) of a top-2 MoE model."""
    root = tmp_path_factory.mktemp("moe")
    run(train_cmd(data, root, "--moe-router", "top2", "--moe-dropless", max_update=60))
    fp32 = root / "fp32.pt"
    consolidate(str(root / "checkpoint_last.pt"), str(fp32), keep_optimizer=False)
    quantize_tool.cli_main([str(fp32), str(root / "int8.pt")])
    return fp32, root / "int8.pt"


@pytest.fixture(scope="module")
def dense(data, tmp_path_factory):
    """(fp32, int8) of plain fairseq's transformer (its own task and criterion, no plugin)."""
    root = tmp_path_factory.mktemp("dense")
    run([cli("fairseq-train"), data, "--task", "translation_multi_simple_epoch", "--lang-pairs", lang_pairs(),
         "--encoder-langtok", "tgt", "--arch", "transformer_tiny", "--share-all-embeddings",
         "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--optimizer", "adam",
         "--lr", "0.002", "--max-tokens", "800", "--max-update", "100", "--save-dir", root, "--cpu",
         "--num-workers", "0", "--no-epoch-checkpoints", "--seed", "3"])
    fp32 = root / "fp32.pt"
    consolidate(str(root / "checkpoint_last.pt"), str(fp32), keep_optimizer=False)
    proc = run([*QUANTIZE, fp32, root / "int8.pt"])  # the console script's entry
    assert "int8 tensors" in proc.stdout
    return fp32, root / "int8.pt"


def bleu_of_generate(data, path, task_flags):
    """fairseq-generate (with --user-dir) on en-de, hypotheses scored by sacrebleu."""
    from moe_fairseq.tools.evaluate import align, parse_generate_output, score

    cmd = [cli("fairseq-generate"), data, "--user-dir", USER_DIR, *task_flags, "--lang-pairs", lang_pairs(),
           "--source-lang", "en", "--target-lang", "de", "--path", path, "--gen-subset", "test", "--beam", "2",
           "--batch-size", "16", "--required-batch-size-multiple", "1", "--cpu"]
    refs = (data.parent / "raw" / "test.de").read_text().splitlines()
    return score(align(parse_generate_output(run(cmd).stdout), len(refs), False, "en-de"), refs)[0]


def test_int8_moe_translates_like_fp32_in_under_40_percent_of_the_file(data, moe):
    fp32, int8 = moe
    assert int8.stat().st_size < 0.4 * fp32.stat().st_size
    state = torch.load(int8)
    assert state["last_optimizer_state"] is None and state["cfg"]["model"].moe_int8_inference is True
    assert state["cfg"]["model"]._name == "transformer_moe_tiny"
    flags = ["--task", "translation_multi_moe", "--encoder-langtok", "src", "--decoder-langtok"]
    ref, got = bleu_of_generate(data, fp32, flags), bleu_of_generate(data, int8, flags)
    assert ref > 2.0, ref  # the fp32 model learnt something to lose
    assert abs(got - ref) <= 2.0, (ref, got)


def test_int8_plain_fairseq_transformer_through_moe_evaluate(data, dense, tmp_path):
    """fairseq's own transformer becomes the plugin's transformer_int8; moe-evaluate (which passes
    --user-dir moe_fairseq to fairseq-generate) loads and scores it."""
    fp32, int8 = dense
    assert int8.stat().st_size < 0.4 * fp32.stat().st_size
    assert torch.load(int8)["cfg"]["model"]._name == "transformer_int8"
    ref = bleu_of_generate(data, fp32, ["--task", "translation_multi_simple_epoch", "--encoder-langtok", "tgt"])
    run([cli("moe-evaluate"), data, "--path", int8, "--lang-pairs", "en-de", "--raw-dir", data.parent / "raw",
         "--beam", "2", "--cpu", "--out", tmp_path, "--", "--post-process", "none"])
    (row,) = json.loads((tmp_path / "results.json").read_text())
    assert row["missing"] == 0
    assert ref > 2.0, ref
    assert abs(row["bleu"] - ref) <= 2.0, (ref, row["bleu"])


def test_fairseq_generate_and_interactive_load_the_int8_moe_checkpoint(data, moe):
    """Both translate every sentence alike.  One sentence a batch in both: the activations are
    quantized per call, so a sentence's numbers depend on the batch it is in (moe/int8.py)."""
    _, int8 = moe
    sources = (data.parent / "raw" / "test.en").read_text().splitlines()
    generate = generate_cmd(data, int8, target="fr")
    generate[generate.index("--batch-size") + 1] = "1"
    generate += ["--required-batch-size-multiple", "1"]  # else fairseq 0.12 may drop a sentence
    generated = hypotheses(run(generate).stdout)
    assert sorted(generated) == list(range(len(sources)))
    cmd = [cli("fairseq-interactive"), data, "--user-dir", USER_DIR, "--task", "translation_multi_moe",
           "--lang-pairs", lang_pairs(), "--encoder-langtok", "src", "--decoder-langtok", "--source-lang", "en",
           "--target-lang", "fr", "--path", int8, "--beam", "2", "--buffer-size", "1", "--batch-size", "1", "--cpu"]
    proc = subprocess.run([str(c) for c in cmd], input="\n".join(sources) + "\n", capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    interactive = hypotheses(proc.stdout)
    assert sorted(interactive) == sorted(generated)
    for i, (score, hyp) in generated.items():
        assert interactive[i][1] == hyp and abs(interactive[i][0] - score) < 1e-4, i
    assert sum(1 for _, hyp in generated.values() if hyp.strip()) > len(sources) // 2, "untrained: empty outputs"
    assert all(w.startswith("fr") for _, hyp in interactive.values() for w in hyp.split())


def test_swap_leaves_only_routers_in_fp32(moe):
    from fairseq.modules import MultiheadAttention

    from moe_fairseq.models.int8_inference import to_int8_
    from moe_fairseq.moe.int8 import Int8Embedding, Int8FFNExperts, Int8Linear
    from moe_fairseq.moe.routers import Router

    fp32, _ = moe
    state = torch.load(fp32)
    model, _ = quantize_tool.build_fp32(state, str(fp32))
    tokens = torch.tensor([[5, 9, 12, 2]])
    with torch.no_grad():
        ref = model(tokens, torch.tensor([4]), torch.tensor([[2, 7, 8]]))[0]
        to_int8_(model)
        got = model(tokens, torch.tensor([4]), torch.tensor([[2, 7, 8]]))[0]
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert routers and all(p.dtype == torch.float32 for r in routers for p in r.parameters())
    router_parts = {id(m) for r in routers for m in r.modules()}
    assert not [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and id(m) not in router_parts]
    assert isinstance(model.encoder.embed_tokens, Int8Embedding)
    assert isinstance(model.decoder.output_projection, Int8Linear)
    assert sum(isinstance(m, Int8FFNExperts) for m in model.modules()) == 2  # transformer_moe_tiny: 1 + 1
    assert all(m.skip_embed_dim_check for m in model.modules() if isinstance(m, MultiheadAttention))
    router_params = {id(p) for r in routers for p in r.parameters()}
    assert all(p.dim() == 1 for p in model.parameters() if id(p) not in router_params)  # layer norms
    # the same model, int8: its log-probabilities follow the fp32 ones closely
    assert (got.log_softmax(-1) - ref.log_softmax(-1)).abs().max() < 0.1 * ref.log_softmax(-1).abs().max()


def test_bad_inputs_are_one_line_errors(moe, data, tmp_path):
    fp32, int8 = moe
    sharded = reshard(str(fp32), str(tmp_path / "sharded"), world_size=2)
    not_a_checkpoint = tmp_path / "junk.pt"
    not_a_checkpoint.write_text("hello")
    lstm = tmp_path / "lstm.pt"
    state = torch.load(fp32)
    state["cfg"]["model"]._name = state["cfg"]["model"].arch = "lstm"
    torch.save(state, lstm)
    cases = [
        ((tmp_path / "missing.pt", tmp_path / "o.pt"), "does not exist"),
        ((not_a_checkpoint, tmp_path / "o.pt"), "cannot be read as a checkpoint"),
        ((sharded, tmp_path / "o.pt"), "is an expert-sharded checkpoint: make one file of it first (moe-consolidate"),
        ((int8, tmp_path / "o.pt"), "is already an int8 checkpoint"),
        ((lstm, tmp_path / "o.pt"), "is a 'lstm' model; moe-quantize takes fairseq's transformer"),
        ((fp32, fp32), "must not overwrite its source"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            quantize_tool.cli_main([str(a) for a in argv])
        assert str(e.value).startswith("moe-quantize: error: ") and message in str(e.value), e.value
        assert "\n" not in str(e.value)
    assert not (tmp_path / "o.pt").exists()
    # the tools that average, prune and reshard fp32 weights refuse an int8 checkpoint
    from moe_fairseq.tools.average import average_checkpoints
    from moe_fairseq.tools.prune import read_consolidated
    from moe_fairseq.moe.errors import MoEUsageError

    for tool, call in (("moe-reshard", lambda: reshard(str(int8), str(tmp_path / "r"), world_size=2)),
                       ("moe-average", lambda: average_checkpoints([str(int8), str(fp32)])),
                       ("moe-prune", lambda: read_consolidated(str(int8)))):
        with pytest.raises(MoEUsageError, match=f"is an int8 checkpoint \\(moe-quantize\\): {tool} works on fp32"):
            call()
    proc = run([*QUANTIZE, sharded, tmp_path / "o.pt"], check=False)  # the console script: one line, no traceback
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0 and "moe-consolidate" in proc.stderr
