"""Tests of data_prep: cleaning, atomic reruns, sentencepiece helpers, recipes (tiny files)."""

import gzip
import os
import sys

import pytest

from data_prep import parallel_files as pf
from data_prep import prepare_multi30k, prepare_wmt10
from data_prep.parallel_files import DataPrepError, Pair


def write(path, lines):
    """Writes lines (each + newline), gzipped if the name ends in .gz; returns the path."""
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, files in os.walk(root) for f in files)


# ------------------------------------------------------------------------------- line counts

def test_line_count_mismatch_names_both_files_and_leaves_nothing(tmp_path):
    good = Pair("en", "fr", write(tmp_path / "g.en", ["a", "b"]), write(tmp_path / "g.fr", ["c", "d"]))
    src = write(tmp_path / "train.en", ["one", "two", "three"])
    tgt = write(tmp_path / "train.de", ["eins", "zwei"])
    out = tmp_path / "out"
    with pytest.raises(DataPrepError) as e:
        # the good pair comes first: its outputs must not be committed either
        pf.clean_pairs([good, Pair("en", "de", src, tgt)], str(out), "train")
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{src} has 3 lines" in msg and f"{tgt} has 2 lines" in msg
    assert not out.exists()  # no outputs, no temp files, not even the directory

    # target longer than source, through the CLI
    write(tmp_path / "train.de", ["eins", "zwei", "drei", "vier"])
    with pytest.raises(SystemExit) as e:
        pf.main(["--out", str(out), "--pair", f"en-de:{src},{tgt}"])
    assert f"{src} has 3 lines but {tgt} has 4 lines" in str(e.value)
    assert not out.exists()


def test_gzip_input_and_raw_dir_cli(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    write(raw / "train.en.gz", ["a small house", "Grüße  aus\tPrag"])
    write(raw / "train.cs.gz", ["malý dům", "pozdrav z Prahy"])
    pf.main(["--out", str(tmp_path / "out"), "--raw-dir", str(raw), "--directions", "en-cs"])
    assert read(tmp_path / "out" / "train.en-cs.en") == ["a small house", "Grüße aus Prag"]
    assert read(tmp_path / "out" / "train.en-cs.cs") == ["malý dům", "pozdrav z Prahy"]
    assert "train en-cs: read 2, kept 2" in capsys.readouterr().out


def test_missing_file_error_names_it(tmp_path):
    with pytest.raises(SystemExit) as e:
        pf.main(["--out", str(tmp_path / "o"), "--pair", f"en-de:{tmp_path}/nope.en,{tmp_path}/x.de"])
    assert f"{tmp_path}/nope.en: no such file" in str(e.value)
    with pytest.raises(SystemExit) as e:
        pf.main(["--out", str(tmp_path / "o"), "--pair", "en-de:only_one_file"])
    assert "--pair" in str(e.value)


# ---------------------------------------------------------------------------------- cleaning

def test_cleaning_filters_exact_outputs(tmp_path):
    src = ["hello world",       # kept
           "   ",               # empty source
           "a b c d e",         # 5 tokens > max_len 4
           "x",                 # ratio 4 > 3
           "hello world",       # duplicate pair
           "hello world",       # same source, other target: not a duplicate
           "one  two\t three",  # whitespace normalized, kept
           "p q r s",           # exactly max_len and ratio 4/... boundary: kept
           "u",                 # ratio exactly 3: kept
           "v"]                 # empty target
    tgt = ["hallo welt", "leer", "a", "x y z w", "hallo welt", "hallo  Welt ", "eins zwei drei",
           "p q r s", "u v w", ""]
    pair = Pair("en", "de", write(tmp_path / "s.en", src), write(tmp_path / "t.de", tgt))
    stats = pf.clean_pairs([pair], str(tmp_path / "out"), "train", max_len=4, max_ratio=3.0,
                           dedup=True)[("en", "de")]
    assert read(tmp_path / "out" / "train.en-de.en") == [
        "hello world", "hello world", "one two three", "p q r s", "u"]
    assert read(tmp_path / "out" / "train.en-de.de") == [
        "hallo welt", "hallo Welt", "eins zwei drei", "p q r s", "u v w"]
    assert (stats.read, stats.kept, stats.empty, stats.too_long, stats.ratio, stats.duplicate) == \
        (10, 5, 2, 1, 1, 1)

    # without --dedup the duplicate stays; --no-filter keeps everything (valid/test sets)
    stats = pf.clean_pairs([pair], str(tmp_path / "nodedup"), "train", max_len=4)[("en", "de")]
    assert stats.kept == 6 and stats.duplicate == 0
    stats = pf.clean_pairs([pair], str(tmp_path / "nofilter"), "test", filter=False)[("en", "de")]
    assert stats.kept == 10
    assert read(tmp_path / "nofilter" / "test.en-de.en")[1] == ""


def test_stray_carriage_return_does_not_split_lines(tmp_path):
    # "\r" and "\u2028" inside a line must neither shift the count nor survive into the output,
    # where fairseq-preprocess (universal newlines) would read them as line breaks.
    src = write(tmp_path / "s.en", ["a\rb", "c\u2028d"])
    tgt = write(tmp_path / "t.de", ["x", "y"])
    pf.clean_pairs([Pair("en", "de", src, tgt)], str(tmp_path), "train", max_ratio=9)
    assert read(tmp_path / "train.en-de.en") == ["a b", "c d"]


def test_max_sentences_still_checks_line_counts(tmp_path):
    src = write(tmp_path / "s.en", ["a", "b", "c"])
    tgt = write(tmp_path / "t.de", ["x", "y"])
    with pytest.raises(DataPrepError, match="has 3 lines"):
        pf.clean_pairs([Pair("en", "de", src, tgt)], str(tmp_path / "o"), "train", max_sentences=1)


# ------------------------------------------------------------------------------ atomic reruns

def test_interrupted_run_keeps_old_outputs_and_rerun_completes(tmp_path, monkeypatch):
    out = tmp_path / "out"
    pair_v1 = Pair("en", "de", write(tmp_path / "v1.en", ["old a", "old b"]),
                   write(tmp_path / "v1.de", ["alt a", "alt b"]))
    pf.clean_pairs([pair_v1], str(out), "train")
    before = {name: (out / name).read_bytes() for name in all_files(out)}
    assert sorted(before) == ["train.en-de.de", "train.en-de.en"]

    new_src = [f"new {i}" for i in range(100)]
    new_tgt = [f"neu {i}" for i in range(100)]
    pair_v2 = Pair("en", "de", write(tmp_path / "v2.en", new_src), write(tmp_path / "v2.de", new_tgt))
    real_normalize, calls = pf.normalize, []

    def crash_mid_write(line):
        calls.append(line)
        if len(calls) == 101:  # half-way through the second run's 200 normalizations
            raise KeyboardInterrupt("simulated crash")
        return real_normalize(line)

    monkeypatch.setattr(pf, "normalize", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        pf.clean_pairs([pair_v2], str(out), "train")
    assert {name: (out / name).read_bytes() for name in all_files(out)} == before  # no temps

    monkeypatch.setattr(pf, "normalize", real_normalize)
    pf.clean_pairs([pair_v2], str(out), "train")
    assert read(out / "train.en-de.en") == new_src
    assert read(out / "train.en-de.de") == new_tgt
    assert all_files(out) == ["train.en-de.de", "train.en-de.en"]


def test_atomic_outputs_failure_keeps_existing_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("finished\n")
    with pytest.raises(RuntimeError):
        with pf.atomic_outputs([str(target)]) as (f,):
            f.write("half-writ")
            raise RuntimeError("boom")
    assert target.read_text() == "finished\n"
    assert os.listdir(tmp_path) == ["f.txt"]


# ----------------------------------------------------------------------------- sentencepiece

def test_sentencepiece_train_encode_and_fairseq_dict(tmp_path):
    import sentencepiece as spm
    from data_prep.synthetic_corpus import sentences
    rows = sentences(300, seed=3)
    inputs = [write(tmp_path / f"train.{lang}", [r[lang] for r in rows]) for lang in ("en", "xa")]
    model = pf.train_sentencepiece(inputs, str(tmp_path / "m" / "spm"), vocab_size=8000,
                                   input_sentence_size=1000)  # far too big: soft limit copes
    assert model == str(tmp_path / "m" / "spm.model")
    assert sorted(os.listdir(tmp_path / "m")) == ["spm.model", "spm.vocab"]  # no temp prefix

    gz_in = write(tmp_path / "valid.xa.gz", [r["xa"] for r in rows[:20]] + [""])
    assert pf.encode_file(model, gz_in, str(tmp_path / "enc" / "valid.xa")) == 21
    encoded = read(tmp_path / "enc" / "valid.xa")
    sp = spm.SentencePieceProcessor(model_file=model)
    assert [sp.decode(line.split()) for line in encoded] == [r["xa"] for r in rows[:20]] + [""]

    n = pf.write_fairseq_dict(str(tmp_path / "m" / "spm.vocab"), str(tmp_path / "dict.txt"))
    entries = read(tmp_path / "dict.txt")
    assert len(entries) == n == sp.get_piece_size() - 3  # minus <unk> <s> </s>
    assert all(line.endswith(" 1") and len(line.split(" ")) == 2 for line in entries)
    tokens = {line.split(" ")[0] for line in entries}
    assert not tokens & set(pf.SPM_SPECIAL_PIECES)
    assert {piece for line in encoded for piece in line.split()} <= tokens


# ---------------------------------------------------------------------------------- recipes

def _fake_multi30k(raw, n=50):
    """A Multi30k-shaped raw dir (gzipped, line-aligned en de fr cs) from the synthetic grammar."""
    from data_prep.synthetic_corpus import sentences
    rows = sentences(3 * n, seed=7)
    as_lang = {"en": "en", "de": "xa", "fr": "xb", "cs": "xc"}
    for i, split in enumerate(("train", "val", "test_2016_flickr")):
        for lang, synth in as_lang.items():
            write(raw / f"{split}.{lang}.gz", [r[synth] for r in rows[i * n:(i + 1) * n]])


def test_multi30k_download_is_atomic_and_skips_existing(tmp_path, monkeypatch):
    import io
    fetched = []

    def fake_urlopen(url, timeout):
        fetched.append(url)
        return io.BytesIO(gzip.compress(url.encode()))

    monkeypatch.setattr(prepare_multi30k.urllib.request, "urlopen", fake_urlopen)
    write(tmp_path / "train.en.gz", ["already here"])
    prepare_multi30k.download(str(tmp_path), ["en", "de"], log=lambda msg: None)
    assert len(fetched) == 5 and not any("train.en.gz" in u for u in fetched)
    assert "/data/task1/raw/test_2016_flickr.de.gz" in fetched[-1]
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"{s}.{lang}.gz" for s in ("train", "val", "test_2016_flickr") for lang in ("en", "de"))


def test_multi30k_missing_file_error(tmp_path, monkeypatch):
    import urllib.request
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used"))
    with pytest.raises(SystemExit) as e:
        prepare_multi30k.main(["--raw-dir", str(tmp_path), "--destdir", str(tmp_path / "bin")])
    assert f"{tmp_path}/train.en.gz: missing Multi30k file" in str(e.value)
    with pytest.raises(SystemExit, match="'xx' is not a Multi30k language"):
        prepare_multi30k.main(["--raw-dir", str(tmp_path), "--directions", "en-xx"])


# Stands in for fairseq-preprocess: records its arguments, writes the files it would write.
_STUB = """
import shutil, sys
a = sys.argv[1:]
arg = lambda flag: a[a.index(flag) + 1]
src, tgt, dest = arg("--source-lang"), arg("--target-lang"), arg("--destdir")
if tgt == "cs":
    print("simulated failure"); sys.exit(3)
for split, flag in (("train", "--trainpref"), ("valid", "--validpref"), ("test", "--testpref")):
    for lang in (src, tgt):
        for ext in ("bin", "idx"):
            open(f"{dest}/{split}.{src}-{tgt}.{lang}.{ext}", "w").write(arg(flag))
shutil.copy(arg("--srcdict"), f"{dest}/dict.{src}.txt")
shutil.copy(arg("--tgtdict"), f"{dest}/dict.{tgt}.txt")
open(f"{dest}/preprocess.log", "w").write(" ".join(a))
"""


def test_pipeline_binarizes_each_pair_once_into_one_dir(tmp_path):
    raw, dest, stub = tmp_path / "raw", tmp_path / "bin", tmp_path / "stub.py"
    raw.mkdir()
    _fake_multi30k(raw, n=30)
    stub.write_text(_STUB)
    cmd = f"{sys.executable} {stub}"
    prepare_multi30k.main(["--raw-dir", str(raw), "--destdir", str(dest), "--directions",
                           "en-de,de-en,fr-en", "--vocab-size", "300", "--fairseq-preprocess", cmd])
    files = set(os.listdir(dest))
    expected = {f"{split}.{pair}.{lang}.{ext}" for pair in ("en-de", "fr-en")
                for split in ("train", "valid", "test") for lang in pair.split("-")
                for ext in ("bin", "idx")}
    assert expected <= files and not any(".de-en." in f for f in files)
    assert {"preprocess.en-de.log", "preprocess.fr-en.log"} <= files
    log = (dest / "preprocess.en-de.log").read_text()
    assert f"--srcdict {dest}/dict.txt --tgtdict {dest}/dict.txt" in log
    assert f"--trainpref {dest}/work/spm/train.en-de" in log and "--workers 2" in log
    assert read(dest / "langs.txt") == ["de", "en", "fr"]
    assert not [f for f in files if f.startswith(".")]

    # other directions into the same directory would replace the dictionary of en-de, fr-en
    with pytest.raises(SystemExit, match=f"{dest} already holds en-de, fr-en from another run"):
        prepare_multi30k.main(["--raw-dir", str(raw), "--destdir", str(dest), "--directions",
                               "en-cs", "--fairseq-preprocess", cmd])

    dest = tmp_path / "bin2"
    with pytest.raises(SystemExit) as e:  # the stub fails for en-cs
        prepare_multi30k.main(["--raw-dir", str(raw), "--destdir", str(dest), "--directions",
                               "en-cs", "--vocab-size", "300", "--fairseq-preprocess", cmd])
    err_log = dest / "preprocess.en-cs.error.log"
    assert f"fairseq-preprocess failed for en-cs (exit 3); output in {err_log}" in str(e.value)
    assert "simulated failure" in err_log.read_text()
    assert not any(f.startswith(".binarize") or f.startswith("train.en-cs")
                   for f in os.listdir(dest))


def test_multi30k_end_to_end(tmp_path):
    """With the fairseq-preprocess of this environment (not whichever is on PATH, if any)."""
    from cli_helpers import cli
    raw, dest = tmp_path / "raw", tmp_path / "bin"
    raw.mkdir()
    _fake_multi30k(raw)
    # One binarized pair keeps this test fast (fairseq-preprocess takes ~5 s to start);
    # several pairs in one directory are covered by the stub test above.
    prepare_multi30k.main(["--raw-dir", str(raw), "--destdir", str(dest), "--directions",
                           "en-de,de-en", "--vocab-size", "300", "--max-train-sentences", "40",
                           "--workers", "1", "--fairseq-preprocess", cli("fairseq-preprocess")])
    files = set(os.listdir(dest))
    for split in ("train", "valid", "test"):
        for lang in ("en", "de"):
            assert {f"{split}.en-de.{lang}.bin", f"{split}.en-de.{lang}.idx"} <= files
    assert not any(f.startswith("train.de-en") for f in files)  # de-en reads the en-de files
    for lang in ("en", "de"):
        assert (dest / f"dict.{lang}.txt").read_bytes() == (dest / "dict.txt").read_bytes()
    assert {"spm.model", "spm.vocab", "langs.txt"} <= files
    assert read(dest / "langs.txt") == ["de", "en"]
    with gzip.open(raw / "test_2016_flickr.de.gz", "rt", encoding="utf-8") as f:
        assert read(dest / "raw" / "test.en-de.de") == f.read().splitlines()  # sacrebleu refs
    assert len(read(dest / "raw" / "valid.en-de.en")) == 50  # evaluation sets are not filtered
    assert len(read(dest / "work" / "clean" / "train.en-de.en")) == 40
    assert not [f for f in files if f.startswith(".")]  # no staging or temp leftovers


def test_wmt10_download_prints_sources_without_network(capsys, monkeypatch):
    import urllib.request
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used"))
    prepare_wmt10.main(["--download", "--languages", "gu,fr"])
    out = capsys.readouterr().out
    assert "== gu-en" in out and "== fr-en" in out and "== de-en" not in out
    assert "sacrebleu -t wmt19 -l gu-en --echo src > test.gu-en.gu" in out


def test_wmt10_layout_errors(tmp_path):
    with pytest.raises(SystemExit, match="--languages: unknown xx"):
        prepare_wmt10.main(["--raw-dir", str(tmp_path), "--languages", "fr,xx"])
    write(tmp_path / "train.ro-en.ro", ["a"])
    write(tmp_path / "train.ro-en.en", ["b"])
    with pytest.raises(SystemExit) as e:
        prepare_wmt10.main(["--raw-dir", str(tmp_path), "--languages", "ro"])
    assert "no raw file for ro of ro-en (looked for valid.ro-en.ro" in str(e.value)
