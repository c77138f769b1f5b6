"""moe-prepare (data_prep/prepare.py) on fixture trees in each real layout and format.

Every fixture is built here from the embedded synthetic corpus (data_prep.synthetic_corpus),
with hand-placed duplicates, empty lines and held-out sentences, so the expected counts follow
from how the fixture was built, not from the code under test. Formats: plain, .gz, .tsv, WMT
.sgm, .tmx; layouts: OPUS-100, FLORES-200, mtdata's output, explicit --pairs.
"""
import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import REPO, USER_DIR, run
from data_prep import layouts, prepare_wmt10, readers
from data_prep.parallel_files import DataPrepError, Pair
from data_prep.prepare import prepare
from data_prep.synthetic_corpus import sentences

# synthetic languages standing in for real ones (the pipeline only sees text)
SYN = {"de": "xa", "fr": "xb", "ru": "xc", "zh": "xa"}
FLORES = {"en": "eng_Latn", "de": "deu_Latn", "fr": "fra_Latn", "ru": "rus_Cyrl", "zh": "zho_Hans"}


def text(row, lang):
    """The fixture's sentence in `lang`; zh reuses xa's words with a marker, so it differs from de."""
    return row["en"] if lang == "en" else row[SYN[lang]] + (" zz" if lang == "zh" else "")


def write(path, lines):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return str(path)


def lines_of(path):
    return Path(path).read_text(encoding="utf-8").splitlines()


# ------------------------------------------------------------------------------ the OPUS-100 tree

N_TRAIN = {"de": 120, "fr": 30}  # unequal sizes: the balanced sample must show it


def opus_tree(root, langs=("de", "fr")):
    """opus-100-corpus/v1.0/supervised/{pair}/opus.{pair}-{split}.{lang}; de-en and en-fr name
    their directories in the two orders OPUS-100 uses. Returns what the pipeline must keep."""
    k = len(langs)
    rows = sentences(20 * k + 140, seed=7)
    held_out = {xx: (rows[20 * i:20 * i + 10], rows[20 * i + 10:20 * i + 20]) for i, xx in enumerate(langs)}
    pool = rows[20 * k:]
    sup = Path(root, "opus-100-corpus", "v1.0", "supervised")
    expected = {}
    for i, xx in enumerate(langs):
        test, dev = held_out[xx]
        n = N_TRAIN.get(xx, 20)
        train = [(text(r, xx), r["en"]) for r in pool[i * 20:i * 20 + n]]
        kept = list(train)
        # injected: 3 exact duplicates, 2 empty lines, one pair whose xx side is in this pair's
        # dev set, one whose English side is only in the test set of ANOTHER language pair
        other_test = held_out[langs[(i + 1) % k]][0]
        injected = [train[0], train[1], train[0], ("", "x"), ("y", ""),
                    (text(dev[3], xx), dev[3]["en"] + " again"),
                    (f"eine neue zeile {xx}", other_test[5]["en"])]
        assert other_test[5]["en"] not in {r["en"] for r in test + dev}
        train = train[:10] + injected + train[10:]
        name = f"{xx}-en" if xx < "en" else f"en-{xx}"
        for split, data in (("train", train), ("dev", [(text(r, xx), r["en"]) for r in dev]),
                            ("test", [(text(r, xx), r["en"]) for r in test])):
            write(sup / name / f"opus.{name}-{split}.{xx}", [a for a, _ in data])
            write(sup / name / f"opus.{name}-{split}.en", [b for _, b in data])
        expected[xx] = {"read": len(train), "cleaned": len(train) - 2,
                        "deduplicated": len(train) - 2 - 3, "held_out_removed": len(kept),
                        "kept_pairs": kept, "valid": len(dev), "test": len(test)}
    return expected


@pytest.fixture(scope="module")
def opus(tmp_path_factory):
    root = tmp_path_factory.mktemp("opus")
    return root, opus_tree(root)


def moe_prepare_cli():
    """The installed console script beside this Python; MOE_PREPARE_CLI overrides it (a checkout
    whose entry points are not installed yet)."""
    return os.environ.get("MOE_PREPARE_CLI") or str(Path(sys.executable).parent / "moe-prepare")


@pytest.fixture(scope="module")
def opus_bin(opus, tmp_path_factory):
    """The documented form, by the console script's name, plus small-corpus sizes."""
    root, expected = opus
    out = tmp_path_factory.mktemp("bin") / "opus100"
    proc = run([moe_prepare_cli(), "--layout", "opus100", root, "--directions", "en-xx", "--out", out,
                "--temperature", "2", "--spm-vocab-size", "150", "--keep-work"], check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, expected


def test_counts_per_direction_and_step(opus_bin):
    out, expected = opus_bin
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["directions"] == ["en-de", "en-fr"]
    for xx, exp in expected.items():
        counts = manifest["counts"][f"en-{xx}"]
        assert {k: counts["train"][k] for k in ("read", "cleaned", "deduplicated", "held_out_removed")} == \
            {k: exp[k] for k in ("read", "cleaned", "deduplicated", "held_out_removed")}
        assert counts["valid"] == {"read": exp["valid"]} and counts["test"] == {"read": exp["test"]}
        # the kept text itself, in order, English first (en-xx)
        assert lines_of(out / "work" / "clean" / f"train.en-{xx}.en") == [e for _, e in exp["kept_pairs"]]
        assert lines_of(out / "work" / "clean" / f"train.en-{xx}.{xx}") == [x for x, _ in exp["kept_pairs"]]


def test_data_bin_reads_back_as_the_sentencepiece_pieces(opus_bin):
    import sentencepiece as spm
    from fairseq.data import Dictionary, data_utils

    out, expected = opus_bin
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    for xx, exp in expected.items():
        for lang, side in (("en", 1), (xx, 0)):
            d = Dictionary.load(str(out / f"dict.{lang}.txt"))
            ds = data_utils.load_indexed_dataset(str(out / f"train.en-{xx}.{lang}"), d)
            assert len(ds) == len(exp["kept_pairs"])
            for i, pair in enumerate(exp["kept_pairs"]):
                tokens = ds[i].tolist()
                assert tokens[-1] == d.eos()
                assert [d[t] for t in tokens[:-1]] == sp.encode(pair[side], out_type=str), (xx, lang, i)
    # one joint dictionary: every language's file is dict.txt
    assert {(out / f"dict.{lang}.txt").read_bytes() for lang in ("en", "de", "fr")} == {(out / "dict.txt").read_bytes()}


def test_sentencepiece_sample_follows_the_temperature(opus_bin):
    """p_l = n_l^(1/T) / sum_k n_k^(1/T), n_l the kept train sentences of language l (English
    counted in both pairs); the sample has round(S * p_l) lines of l, S = all sentences here."""
    out, expected = opus_bin
    n = {xx: len(exp["kept_pairs"]) for xx, exp in expected.items()}
    n["en"] = sum(n.values())
    T, S = 2.0, sum(n.values())
    z = sum(v ** (1 / T) for v in n.values())
    for lang, size in n.items():
        sample = lines_of(out / "work" / "spm_sample" / f"{lang}.txt")
        assert len(sample) == round(S * size ** (1 / T) / z), lang
    de = lines_of(out / "work" / "spm_sample" / "de.txt")
    assert set(de) <= {x for x, _ in expected["de"]["kept_pairs"]}
    fr = lines_of(out / "work" / "spm_sample" / "fr.txt")  # 30 sentences, upsampled
    assert len(fr) > n["fr"] and set(fr) == {x for x, _ in expected["fr"]["kept_pairs"]}
    sp_settings = json.loads((out / "manifest.json").read_text())["sentencepiece"]
    assert sp_settings["temperature"] == 2.0 and sp_settings["character_coverage"] == 1.0


def test_manifest_records_sources_and_command(opus, opus_bin):
    root, _ = opus
    out, _ = opus_bin
    manifest = json.loads((out / "manifest.json").read_text())
    files = sorted(str(p) for p in Path(root).rglob("opus.*"))
    assert [s["path"] for s in manifest["sources"]] == files
    for s in manifest["sources"]:
        assert s["sha256"] == hashlib.sha256(Path(s["path"]).read_bytes()).hexdigest()
    assert manifest["command"].startswith(f"moe-prepare --layout opus100 {root} --directions en-xx")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no stage left


# --------------------------------------------------------------- formats through --pairs

STUB_PREPROCESS = r"""
import shutil, sys
a = sys.argv[1:]
arg = lambda flag: a[a.index(flag) + 1]
src, tgt, dest = arg("--source-lang"), arg("--target-lang"), arg("--destdir")
for split, flag in (("train", "--trainpref"), ("valid", "--validpref"), ("test", "--testpref")):
    if flag in a:
        for lang in (src, tgt):
            for ext in ("bin", "idx"):
                open(f"{dest}/{split}.{src}-{tgt}.{lang}.{ext}", "w").write(arg(flag))
for lang in (src, tgt):
    shutil.copy(arg("--srcdict"), f"{dest}/dict.{lang}.txt")
"""


def sgm(path, kind, lang, segs):
    body = "".join(f'<seg id="{i}">{s.replace("&", "&amp;")}</seg>\n' for i, s in enumerate(segs, 1))
    return write(path, [f'<{kind} setid="newstest" srclang="any" trglang="{lang}">',
                        '<doc docid="d1" genre="news">' + "\n" + body.rstrip("\n"), "</doc>", f"</{kind}>"])


def tmx(path, pairs, langs=("de", "en")):
    tus = "".join(f'<tu><tuv xml:lang="{langs[0].upper()}"><seg>{a}</seg></tuv>'
                  f'<tuv xml:lang="{langs[1]}-GB"><seg>{b}<ph>&lt;b/&gt;</ph></seg></tuv></tu>\n'
                  for a, b in pairs)
    return write(path, ['<?xml version="1.0" encoding="utf-8"?>', '<tmx version="1.4"><header/><body>',
                        tus.rstrip("\n"), "</body></tmx>"])


@pytest.fixture()
def stub(tmp_path):
    path = tmp_path / "stub_preprocess.py"
    path.write_text(STUB_PREPROCESS)
    return f"{sys.executable} {path}"


def test_every_format_through_pairs_and_both_directions(tmp_path, stub):
    rows = sentences(90, seed=3)
    de = [(r["xa"], r["en"]) for r in rows]
    d = tmp_path / "raw"
    plain = [write(d / "ep.de.gz", [a for a, _ in de[:20]]), write(d / "ep.en", [b for _, b in de[:20]])]
    tsv = write(d / "nc.de-en.tsv", [f"{a}\t{b}" for a, b in de[20:40]])
    tsv_rev = write(d / "wt.en-de.tsv.gz", [f"{b}\t{a}" for a, b in de[40:50]])  # columns en, de
    tm = tmx(d / "para.tmx", de[50:60] + [de[0]])  # de[0] again: a duplicate across corpora
    dev = [write(d / "dev.de", [a for a, _ in de[60:70]]), write(d / "dev.en", [b for _, b in de[60:70]])]
    test = [sgm(d / "newstest-src.de.sgm", "srcset", "de", [a for a, _ in de[70:80]] + ["A & B"]),
            sgm(d / "newstest-ref.en.sgm", "refset", "en", [b for _, b in de[70:80]] + ["A & B"])]
    out = tmp_path / "bin"
    manifest = prepare(["--pairs", f"train:de-en:{','.join(plain)}", f"train:de-en:{tsv}",
                        f"train:en-de:{tsv_rev}", f"train:de-en:{tm}", f"dev:de-en:{','.join(dev)}",
                        f"test:de-en:{','.join(test)}", "--directions", "both", "--out", str(out),
                        "--spm-vocab-size", "100", "--keep-work", "--fairseq-preprocess", stub])
    assert manifest["directions"] == ["de-en", "en-de"]
    train = manifest["counts"]["de-en"]["train"]
    assert (train["read"], train["deduplicated"], train["kept"]) == (61, 60, 60)
    clean = out / "work" / "clean"
    # tsv columns follow the direction given; tmx by xml:lang (EN, de-GB), <ph> codes dropped
    assert lines_of(clean / "train.de-en.de") == [a for a, _ in de[:60]]
    assert lines_of(clean / "train.de-en.en") == [b for _, b in de[:60]]
    assert lines_of(out / "raw" / "test.de-en.de")[-1] == "A & B"  # sgm entities unescaped
    assert manifest["counts"]["en-de"]["test"] == {"read": 11}
    assert {"train.de-en.de.bin", "dict.txt", "spm.model", "manifest.json"} <= set(os.listdir(out))


# --------------------------------------------------------------------- malformed files

def _one_line(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg


def test_malformed_and_truncated_file_of_each_format(tmp_path, monkeypatch):
    good = [("ein haus", "a house"), ("zwei", "two")]
    # plain .gz cut short
    gz = tmp_path / "c.de.gz"
    write(gz, ["x" * 50] * 200)
    gz.write_bytes(gz.read_bytes()[:60])
    with pytest.raises(DataPrepError) as e:
        list(readers.read_sentences(str(gz)))
    _one_line(e, str(gz), "cannot read")
    # plain, not UTF-8
    bad = tmp_path / "latin1.de"
    bad.write_bytes("ok\nstra\xdfe\n".encode("latin-1"))
    with pytest.raises(DataPrepError) as e:
        list(readers.read_sentences(str(bad)))
    _one_line(e, str(bad), "not valid UTF-8")
    # tsv: a line without its second column (a file cut mid-line)
    tsv = write(tmp_path / "c.tsv", ["ein\tone", "zwei\ttwo", "drei"])
    with pytest.raises(DataPrepError) as e:
        list(readers.read_pair(Pair("de", "en", tsv, tsv)))
    _one_line(e, tsv, "line 3 has 1 tab-separated field(s)")
    # sgm: truncated before </refset>, and a <seg> without </seg>
    s = sgm(tmp_path / "ref.en.sgm", "refset", "en", ["a", "b", "c"])
    Path(s).write_text("\n".join(lines_of(s)[:-2]) + "\n")
    with pytest.raises(DataPrepError) as e:
        list(readers.read_sentences(s))
    _one_line(e, s, "truncated", "</refset>")
    s2 = write(tmp_path / "src.de.sgm", ['<srcset setid="x">', '<doc docid="d">', '<seg id="1">a</seg>',
                                         '<seg id="2">b', "</doc>", "</srcset>"])
    with pytest.raises(DataPrepError) as e:
        list(readers.read_sentences(s2))
    _one_line(e, s2, "line 4", "<seg> without </seg>")
    # tmx: cut mid-element, and broken XML
    t = tmx(tmp_path / "c.tmx", good)
    Path(t).write_text(Path(t).read_text()[:-40])
    with pytest.raises(DataPrepError) as e:
        list(readers.read_pair(Pair("de", "en", t, t)))
    _one_line(e, t, "malformed or truncated TMX at line")
    t2 = write(tmp_path / "b.tmx", ["<tmx><body><tu><tuv xml:lang='de'><seg>a & b</seg></tuv></tu></body></tmx>"])
    with pytest.raises(DataPrepError) as e:
        list(readers.read_pair(Pair("de", "en", t2, t2)))
    _one_line(e, t2, "line 1")
    # through the command line: exit with one line naming the file, and nothing written
    out = tmp_path / "out"
    from data_prep.prepare import cli_main

    monkeypatch.setattr(sys, "argv", ["moe-prepare", "--pairs", f"train:de-en:{tsv}", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        cli_main()
    assert str(e.value).startswith("moe-prepare: error: ") and tsv in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_out_is_refused_unless_force_and_a_failed_run_keeps_it(tmp_path, stub):
    rows = sentences(40, seed=5)
    d = tmp_path / "raw"
    args = []
    for split, part in (("train", rows[:20]), ("valid", rows[20:30]), ("test", rows[30:])):
        args.append(f"{split}:fr-en:{write(d / f'{split}.fr', [r['xb'] for r in part])},"
                    f"{write(d / f'{split}.en', [r['en'] for r in part])}")
    out = tmp_path / "bin"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    base = ["--pairs", *args, "--out", str(out), "--spm-vocab-size", "60", "--fairseq-preprocess", stub]
    with pytest.raises(DataPrepError, match=r"--out .*bin exists and is not empty: .* --force"):
        prepare(base)
    write(d / "train.en", [r["en"] for r in rows[:19]])  # now one line short
    with pytest.raises(DataPrepError, match="line count mismatch"):
        prepare(base + ["--force"])
    assert os.listdir(out) == ["keep.txt"]  # the failed run changed nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "raw", "stub_preprocess.py"]
    write(d / "train.en", [r["en"] for r in rows[:20]])
    prepare(base + ["--force"])
    assert "keep.txt" not in os.listdir(out) and (out / "manifest.json").is_file()


# ------------------------------------------------------------------------ layouts

def test_opus100_root_at_the_top_or_at_supervised(opus):
    root, _ = opus
    for r in (root, root / "opus-100-corpus", root / "opus-100-corpus" / "v1.0" / "supervised"):
        found = layouts.opus100(str(r))
        assert sorted((p.src, p.tgt) for p in found["train"]) == [("de", "en"), ("fr", "en")]
        assert all(p.tgt_path.endswith(".en") for p in found["test"])
    assert [p.src for p in layouts.opus100(str(root), {"fr"})["valid"]] == ["fr"]
    with pytest.raises(DataPrepError, match="--langs: it not found in opus100"):
        layouts.opus100(str(root), {"fr", "it"})
    with pytest.raises(DataPrepError, match="holds no opus-100-corpus"):
        layouts.opus100(str(root / "opus-100-corpus" / "v1.0" / "supervised" / "de-en"))


def flores_tree(root, langs=("en", "de", "fr"), n_dev=8, n_devtest=12, seed=11):
    """flores200_dataset/{dev,devtest}/{code}.{split}: multi-way parallel, one file a language."""
    rows = sentences(n_dev + n_devtest, seed=seed)
    top = Path(root, "flores200_dataset")
    for split, part in (("dev", rows[:n_dev]), ("devtest", rows[n_dev:])):
        for lang in langs:
            write(top / split / f"{FLORES[lang]}.{split}", [text(r, lang) for r in part])
    return rows[n_dev:]


def test_flores_codes_map_to_the_projects(tmp_path):
    flores_tree(tmp_path)
    write(tmp_path / "flores200_dataset" / "devtest" / "xyz_Latn.devtest", ["a"] * 12)
    found = layouts.flores(str(tmp_path))
    assert sorted((p.src, p.tgt) for p in found["test"]) == [("de", "en"), ("fr", "en")]
    assert found["test"][0].src_path.endswith("deu_Latn.devtest")
    assert found["valid"][0].src_path.endswith("deu_Latn.dev")
    mapped = layouts.flores(str(tmp_path / "flores200_dataset"), {"xy"}, {"xyz_Latn": "xy"})
    assert [p.src for p in mapped["test"]] == ["xy"] and mapped["valid"] == []
    with pytest.raises(DataPrepError, match="--langs: cs has no FLORES file .* --lang-map"):
        layouts.flores(str(tmp_path), {"cs"})
    with pytest.raises(DataPrepError, match="--lang-map: 'deu_Latn' is not like deu_Latn=de"):
        layouts.parse_lang_map("deu_Latn")


def mtdata_tree(root, langs, n_train=24, seed=13, merged=True):
    """What `mtdata get -l xxx-eng --merge ... -o root/{xx}-en` writes, for each language."""
    iso3 = {ours: code for code, ours in layouts.ISO3_CODES.items()}
    rows = sentences(n_train + 10, seed=seed)
    for i, xx in enumerate(langs):
        d, code = Path(root, f"{xx}-en"), iso3[xx]
        part = rows[10:]
        src = [r[("xa", "xb", "xc")[i % 3]] + f" {xx}{i}" for r in part]
        if merged:
            write(d / f"train.{code}", src)
            write(d / "train.eng", [r["en"] for r in part])
            write(d / "train.meta.jsonl.gz", ["{}"] * len(part))
        else:
            write(d / "train-parts" / f"Statmt-x-1-{code}-eng.{code}", src[:10])
            write(d / "train-parts" / f"Statmt-x-1-{code}-eng.eng", [r["en"] for r in part[:10]])
            write(d / "train-parts" / f"Statmt-y-2-eng-{code}.{code}", src[10:])
            write(d / "train-parts" / f"Statmt-y-2-eng-{code}.eng", [r["en"] for r in part[10:]])
        for stem, did, sl in (("dev", f"Statmt-newsdev_{xx}en-2019-{code}-eng", rows[:5]),
                              ("test1", f"Statmt-newstest_{xx}en-2019-{code}-eng", rows[5:10])):
            write(d / "tests" / f"{did}.{code}", [r[("xa", "xb", "xc")[i % 3]] + f" {xx}{i}" for r in sl])
            write(d / "tests" / f"{did}.eng", [r["en"] for r in sl])
            for lang in (code, "eng"):
                os.symlink(f"tests/{did}.{lang}", d / f"{stem}.{lang}")
        write(d / "mtdata.signature.txt", ["mtdata get ..."])


def test_mtdata_layout_merged_and_unmerged(tmp_path):
    mtdata_tree(tmp_path / "m", ["de", "gu"])
    found = layouts.mtdata(str(tmp_path / "m"))
    assert sorted((p.src, p.tgt) for p in found["train"]) == [("de", "en"), ("gu", "en")]
    de = next(p for p in found["train"] if p.src == "de")
    assert de.src_path.endswith("train.deu") and de.tgt_path.endswith("train.eng")
    assert [p.src_path.endswith("test1.guj") for p in found["test"] if p.src == "gu"] == [True]
    one = layouts.mtdata(str(tmp_path / "m" / "de-en"))  # a single pair directory
    assert [(p.src, p.tgt) for p in one["valid"]] == [("de", "en")]
    mtdata_tree(tmp_path / "u", ["fr"], merged=False)
    parts = layouts.mtdata(str(tmp_path / "u"))["train"]
    assert [(p.src, os.path.basename(p.src_path)) for p in parts] == \
        [("fr", "Statmt-x-1-fra-eng.fra"), ("fr", "Statmt-y-2-eng-fra.fra")]
    assert sum(1 for p in parts for _ in readers.read_pair(p)) == 24


def test_wmt10_without_mtdata_or_network_fails_in_one_line(tmp_path, monkeypatch):
    """The one network function (prepare_wmt10.fetch_wmt10) is made to fail; nothing is fetched."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mtdata" else real(name, *a))
    with pytest.raises(DataPrepError) as e:
        prepare(["--wmt10", "--langs", "gu", "--download-dir", str(tmp_path / "dl"), "--out", str(tmp_path / "o")])
    _one_line(e, "pip install .[data]")
    monkeypatch.setattr(importlib.util, "find_spec", real)
    failing = [sys.executable, "-c", "import sys; print('requests.exceptions.ConnectionError: "
               "Max retries exceeded', file=sys.stderr); sys.exit(1)"]
    monkeypatch.setattr(prepare_wmt10, "MTDATA_CMD", failing)
    with pytest.raises(DataPrepError) as e:
        prepare(["--wmt10", "--langs", "gu", "--download-dir", str(tmp_path / "dl"), "--out", str(tmp_path / "o")])
    _one_line(e, "--wmt10: mtdata could not fetch gu-en", "ConnectionError", "check the network")
    with pytest.raises(DataPrepError, match="--langs: xx is not a WMT-10 language"):
        prepare(["--wmt10", "--langs", "xx", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


# ---------------------------------------------- the real configs train, moe-evaluate scores FLORES

TRAIN_DRIVER = r"""
import json, os, sys
os.dup2(1, 2)
import torch
torch.set_num_threads(1)
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.distributed import utils as distributed_utils
from fairseq_cli.train import main
for label, argv in json.loads(sys.argv[1]):
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=argv)
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), main)
    print("=== trained " + label, flush=True)
"""
# only sizes change (and what a CPU cannot run: the GPU precision flag)
SIZE_OVERRIDES = ["--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "16",
                  "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
                  "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--max-tokens", "400",
                  "--update-freq", "1", "--max-update", "2", "--warmup-updates", "1", "--num-workers", "0",
                  "--validate-interval-updates", "2", "--save-interval-updates", "2", "--log-interval", "1",
                  "--cpu"]
GPU_PRECISION = {"--fp16", "--fp16-no-flatten-grads", "--bf16", "--amp", "--memory-efficient-fp16"}


def config_argv(path):
    return [tok for line in Path(path).read_text().splitlines() if not line.startswith("#")
            for tok in line.split() if tok not in GPU_PRECISION]


def test_wmt10_and_opus100_configs_train_on_prepared_data_and_evaluate_on_flores(tmp_path):
    wmt10 = list(prepare_wmt10.LANGS)
    mtdata_tree(tmp_path / "mtdata", wmt10, n_train=16)
    opus_tree(tmp_path / "opus", langs=("de", "fr", "ru", "zh"))
    flores = tmp_path / "flores"
    devtest = flores_tree(flores, langs=("en", "de", "fr", "ru", "zh"))
    wmt_bin, opus_bin = tmp_path / "wmt10-bin", tmp_path / "opus100-bin"
    prepare(["--layout", "mtdata", str(tmp_path / "mtdata"), "--out", str(wmt_bin), "--spm-vocab-size", "200"])
    prepare(["--layout", "opus100", str(tmp_path / "opus"), "--directions", "en-xx", "--out", str(opus_bin),
             "--spm-vocab-size", "200"])
    jobs = [[name, [str(data), "--user-dir", USER_DIR, *config_argv(REPO / "configs" / name / "moe_top2.args"),
                    *SIZE_OVERRIDES, "--save-dir", str(tmp_path / f"ckpt-{name}")]]
            for name, data in (("wmt10", wmt_bin), ("opus100", opus_bin))]
    proc = run([sys.executable, "-c", TRAIN_DRIVER, json.dumps(jobs)], timeout=600)
    for name, _ in jobs:
        assert f"=== trained {name}" in proc.stdout, proc.stdout[-3000:]
    ckpt = tmp_path / "ckpt-opus100" / "checkpoint_last.pt"
    assert ckpt.is_file()
    from moe_fairseq.tools.evaluate import main as moe_evaluate

    out = tmp_path / "scores"
    rows = moe_evaluate([str(opus_bin), "--path", str(ckpt), "--lang-pairs", "en-de", "--layout", "flores",
                         str(flores), "--split", "devtest", "--cpu", "--beam", "1", "--out", str(out),
                         "--", "--max-len-b", "5"])
    import sacrebleu

    assert [r["direction"] for r in rows] == ["en-de"] and rows[0]["sentences"] == len(devtest)
    hyps = [line.split("\t")[2] for line in (out / f"generate.devtest.en-de.txt").read_text().splitlines()
            if line.startswith("D-")]
    assert len(hyps) == len(devtest)
    assert not any("\u2581" in h for h in hyps)  # sentencepiece post-processing (the default)
    ids = [int(line.split("\t")[0][2:]) for line in (out / "generate.devtest.en-de.txt").read_text().splitlines()
           if line.startswith("D-")]
    ordered = [h for _, h in sorted(zip(ids, hyps))]
    refs = [text(r, "de") for r in devtest]
    assert rows[0]["bleu"] == pytest.approx(round(sacrebleu.corpus_bleu(ordered, [refs]).score, 2))
    assert rows[0]["chrf"] == pytest.approx(round(sacrebleu.corpus_chrf(ordered, [refs]).score, 2))
    assert rows[0]["signature"].startswith("nrefs:1|case:mixed") and rows[0]["chrf_signature"].startswith("nrefs:1")
    saved = json.loads((out / "results.json").read_text())
    assert saved == rows and "chrF signature" in (out / "results.md").read_text()


def test_prepare_wmt10_sh_old_layout_goes_through_moe_prepare(tmp_path, stub):
    """data_prep/prepare_wmt10.sh's hand-assembled {split}.{xx}-en.{lang} directory still works:
    it becomes moe-prepare --pairs (all 20 directions when all languages are there)."""
    raw = tmp_path / "raw"
    rows = sentences(60, seed=17)
    for i, xx in enumerate(("ro", "gu")):
        for split, part in (("train", rows[20:]), ("valid", rows[:10]), ("test", rows[10:20])):
            write(raw / (f"{split}.{xx}-en.{xx}" + (".gz" if split == "train" else "")),
                  [r[("xa", "xb")[i]] for r in part])
            write(raw / f"{split}.{xx}-en.en", [r["en"] for r in part])
    out = tmp_path / "wmt10"
    proc = subprocess.run(["bash", str(REPO / "data_prep" / "prepare_wmt10.sh"), "--raw-dir", str(raw),
                           "--languages", "ro,gu", "--destdir", str(out), "--vocab-size", "80",
                           "--fairseq-preprocess", stub], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["directions"] == ["ro-en", "en-ro", "gu-en", "en-gu"]
    assert manifest["counts"]["gu-en"]["train"]["kept"] == 40
    assert manifest["command"].startswith("moe-prepare --pairs train:ro-en:")
    assert {"train.ro-en.ro.bin", "test.gu-en.en.idx", "spm.model"} <= set(os.listdir(out))


@pytest.mark.parametrize("name", ["moe_top2", "dense"])
def test_opus100_configs_are_wmt10s_recipe_on_other_directions(name):
    from test_recipes import config_flags

    opus, wmt = (config_flags(REPO / "configs" / setup / f"{name}.args") for setup in ("opus100", "wmt10"))
    assert opus.pop("--lang-pairs") == "en-de,en-fr,en-ru,en-zh"
    wmt.pop("--lang-pairs")
    assert opus == wmt


FAKE_MTDATA = r"""
import json, os, sys
a = sys.argv[1:]
out, langs = a[a.index("-o") + 1], a[a.index("-l") + 1]
code = langs.split("-")[0]
os.makedirs(out, exist_ok=True)
with open(os.path.join(os.path.dirname(out), "calls.jsonl"), "a") as f:
    f.write(json.dumps(a) + "\n")
rows = json.loads(os.environ["FAKE_ROWS"])
for stem, part in (("train", rows[10:]), ("dev", rows[:5]), ("test1", rows[5:10])):
    for lang, key in ((code, "xb"), ("eng", "en")):
        with open(os.path.join(out, f"{stem}.{lang}"), "w") as f:
            f.write("".join(r[key] + " " + code * (lang != "eng") + "\n" for r in part))
"""


def test_wmt10_fetches_with_mtdata_then_prepares(tmp_path, stub, monkeypatch):
    """--wmt10 with a stand-in for mtdata's command line: the dataset ids of WMT10_MTDATA are
    asked for, one `mtdata get` per language, and a language already fetched is not fetched again."""
    fake = tmp_path / "fake_mtdata.py"
    fake.write_text(FAKE_MTDATA)
    monkeypatch.setattr(prepare_wmt10, "MTDATA_CMD", [sys.executable, str(fake)])
    monkeypatch.setenv("FAKE_ROWS", json.dumps(sentences(30, seed=19)))
    dl = tmp_path / "dl"
    argv = ["--wmt10", "--langs", "gu,ro", "--download-dir", str(dl), "--spm-vocab-size", "80",
            "--fairseq-preprocess", stub]
    manifest = prepare(argv + ["--out", str(tmp_path / "a")])
    calls = [json.loads(line) for line in (dl / "calls.jsonl").read_text().splitlines()]
    assert [c[c.index("-l") + 1] for c in calls] == ["guj-eng", "ron-eng"]
    gu = calls[0]
    assert gu[gu.index("-tr") + 1:gu.index("-dv")] == prepare_wmt10.WMT10_MTDATA["gu"][1]
    assert gu[gu.index("-dv") + 1] == "Statmt-newsdev_guen-2019-guj-eng"
    assert gu[gu.index("-ts") + 1] == "Statmt-newstest_guen-2019-guj-eng" and "--merge" in gu
    assert manifest["directions"] == ["gu-en", "en-gu", "ro-en", "en-ro"]
    assert manifest["counts"]["gu-en"]["train"]["kept"] == 20
    prepare(argv + ["--out", str(tmp_path / "b")])  # fetched already: mtdata is not run again
    assert len((dl / "calls.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("flags,message", [
    (["--spm-character-coverage", "1.5"], "--spm-character-coverage: 1.5 is not allowed (must be in (0, 1]"),
    (["--temperature", "0"], "--temperature: 0.0 is not allowed (must be > 0)"),
    (["--layout", "europarl", "x"], "--layout: 'europarl' is not one of opus100, flores, mtdata"),
    ([], "no source: give --pairs, --layout NAME ROOT or --wmt10"),
    (["--pairs", "training:de-en:a,b"], "--pairs: 'training:de-en:a,b' is not like SPLIT:SRC-TGT:FILE[,FILE]"),
])
def test_bad_flags_are_one_line_errors_naming_the_flag(tmp_path, flags, message):
    with pytest.raises(DataPrepError) as e:
        prepare([*flags, "--out", str(tmp_path / "o")])
    _one_line(e, message)
