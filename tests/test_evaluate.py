"""moe-evaluate's alignment of fairseq-generate output to the references (no fairseq run)."""
from pathlib import Path

import pytest

from moe_fairseq.checkpoint.saved_args import read_saved_args
from moe_fairseq.tools.evaluate import align, find_references, markdown_table, parse_generate_output, score
from moe_fairseq.moe.errors import MoEUsageError

GENERATE_OUTPUT = """S-2\t__en__ a b
T-2\tx y
H-2\t-0.5\t▁x ▁y
D-2\t-0.5\tx y
P-2\t-0.1 -0.2
S-0\t__en__ c
H-0\t-0.3\t▁z
D-0\t-0.3\tz
"""


def test_hypotheses_are_keyed_by_sentence_id_not_by_order():
    assert parse_generate_output(GENERATE_OUTPUT) == {2: "x y", 0: "z"}
    assert align({2: "x y", 0: "z", 1: "w"}, 3, False, "en-de") == ["z", "w", "x y"]


def test_a_missing_sentence_is_refused_not_scored_on_a_shorter_list():
    with pytest.raises(MoEUsageError, match=r"returned 2 of 3 sentences \(missing ids \[1\]\)"):
        align({0: "z", 2: "x y"}, 3, False, "en-de")
    assert align({0: "z", 2: "x y"}, 3, True, "en-de") == ["z", "", "x y"]


def test_ids_beyond_the_references_mean_the_wrong_reference_file():
    with pytest.raises(MoEUsageError, match="outside the 2 references"):
        align({0: "a", 1: "b", 5: "c"}, 2, False, "en-de")


def test_scores_match_sacrebleu_and_table_carries_the_signature():
    import sacrebleu

    hyps, refs = ["the cat sat on the mat", "a dog"], ["the cat sat on a mat", "a dog runs"]
    bleu, signature = score(hyps, refs)
    assert bleu == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert signature.startswith("nrefs:1|case:mixed") and "tok:13a" in signature
    table = markdown_table([{"direction": "en-de", "bleu": bleu, "sentences": 2, "signature": signature}])
    assert "| en-de |" in table and signature in table


def test_reference_lookup(tmp_path):
    (tmp_path / "test.fr-en.fr").write_text("x\n")
    (tmp_path / "test.de").write_text("x\n")
    assert find_references(tmp_path, "test", "en", "fr") == tmp_path / "test.fr-en.fr"
    assert find_references(tmp_path, "test", "en", "de") == tmp_path / "test.de"
    with pytest.raises(MoEUsageError, match="no references for en-cs"):
        find_references(tmp_path, "test", "en", "cs")


def test_a_file_that_is_not_a_checkpoint_is_a_one_line_error(tmp_path):
    """A truncated or foreign file at --path: one line naming it, not torch's dozen-line trace."""
    import torch

    text = tmp_path / "checkpoint_last.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(MoEUsageError, match=r"^--path \S*checkpoint_last\.pt cannot be read as a checkpoint \(") as e:
        read_saved_args(str(text), "--path")
    assert "\n" not in str(e.value)
    truncated = tmp_path / "truncated.pt"
    torch.save({"cfg": {"model": {"arch": "x"}}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(MoEUsageError, match=r"truncated\.pt cannot be read as a checkpoint"):
        read_saved_args(str(truncated), "--path")
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), tensor)
    with pytest.raises(MoEUsageError, match=r"tensor\.pt is not a fairseq checkpoint"):
        read_saved_args(str(tensor), "--path")
    no_args = tmp_path / "no_args.pt"
    torch.save({"model": {}}, no_args)
    with pytest.raises(MoEUsageError, match=r"no_args\.pt holds neither cfg nor args"):
        read_saved_args(str(no_args), "--path")


def test_generate_command_carries_post_process_and_keeps_every_sentence(monkeypatch):
    """--post-process reaches fairseq-generate; --required-batch-size-multiple 1 stops the
    multilingual batch sampler from dropping the last sentences (12 -> 8 at the default 8)."""
    import subprocess

    from moe_fairseq.tools import evaluate

    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(evaluate.subprocess, "run", fake_run)
    evaluate.run_generate("DATA", "ck.pt", "en", "de", "en-de", "test", 1, 8, True, ["--nbest", "1"], [], "none")
    cmd = seen[0]
    assert cmd[cmd.index("--post-process") + 1] == "none"
    assert cmd[cmd.index("--required-batch-size-multiple") + 1] == "1"
    assert cmd[-2:] == ["--nbest", "1"]  # the user's generate args come last and win


def test_unknown_post_process_and_missing_references_are_one_line_errors(tmp_path):
    from moe_fairseq.tools.evaluate import main

    ckpt = tmp_path / "c.pt"
    ckpt.write_text("x")
    with pytest.raises(SystemExit, match="--post-process: 'bpe' is not one of sentencepiece, subword_nmt, none"):
        main(["D", "--path", str(ckpt), "--lang-pairs", "en-de", "--raw-dir", "R", "--post-process", "bpe"])
    with pytest.raises(SystemExit, match="give the references with one of --raw-dir, --layout flores ROOT, --pairs"):
        main(["D", "--path", str(ckpt), "--lang-pairs", "en-de"])


def test_wmt_sgm_test_set_is_read_through_moe_prepares_readers(tmp_path):
    """--pairs test:de-en:SRC.sgm,REF.sgm, asked for as en-de: sources and references swap."""
    import argparse

    from moe_fairseq.tools.evaluate import read_test_sets

    def sgm(path, kind, segs):
        path.write_text(f'<{kind} setid="newstest2018">\n<doc docid="a">\n'
                        + "".join(f'<seg id="{i}"> {s} </seg>\n' for i, s in enumerate(segs, 1)) + f"</doc>\n</{kind}>\n")
        return str(path)

    src = sgm(tmp_path / "newstest2018-deen-src.de.sgm", "srcset", ["Ein  Haus", "Tom &amp; Jerry"])
    ref = sgm(tmp_path / "newstest2018-deen-ref.en.sgm", "refset", ["A house", "Tom &amp; Jerry"])
    args = argparse.Namespace(split="test", layout=None, pairs=[f"test:de-en:{src},{ref}"], lang_map=None)
    sets = read_test_sets(args, [("en", "de"), ("de", "en")])
    assert sets["de-en"] == (["Ein Haus", "Tom & Jerry"], ["A house", "Tom & Jerry"])
    assert sets["en-de"] == (["A house", "Tom & Jerry"], ["Ein Haus", "Tom & Jerry"])
    with pytest.raises(MoEUsageError, match="no test set for fr-en in --pairs"):
        read_test_sets(args, [("fr", "en")])
    Path(ref).write_text(Path(ref).read_text().replace("</refset>\n", ""))
    with pytest.raises(MoEUsageError, match=r"ref\.en\.sgm: truncated"):
        read_test_sets(args, [("de", "en")])
