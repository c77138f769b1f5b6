"""Tests of the embedded synthetic quickstart corpus (data_prep/synthetic_corpus.py)."""

import os

import pytest

from data_prep import synthetic_corpus as sc


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def entry(cat, english):
    return next(e for e in sc.LEXICON[cat] if english in e[0])


def np(det, noun, adj=None, col=None, plural=False):
    return {"det": entry("PDET" if det in ("these", "those", "two", "three", "four", "five")
                         else "DET", det),
            "adj": adj and entry("ADJ", adj), "col": col and entry("COL", col),
            "noun": entry("N", noun), "plural": plural}


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = sc.generate(300, 20, 20, seed=5, out_dir=str(tmp_path / "a"))
    b = sc.generate(300, 20, 20, seed=5, out_dir=str(tmp_path / "b"))
    c = sc.generate(300, 20, 20, seed=6, out_dir=str(tmp_path / "c"))
    assert len(a) == 12
    for key in a:
        with open(a[key], "rb") as fa, open(b[key], "rb") as fb:
            assert fa.read() == fb.read(), key
    assert read(a[("train", "en")]) != read(c[("train", "en")])
    assert sorted(os.listdir(tmp_path / "a")) == sorted(
        f"{s}.{lang}" for s in ("train", "valid", "test") for lang in sc.LANGS)  # no temp files


def test_files_are_aligned_sized_and_splits_disjoint(tmp_path):
    paths = sc.generate(400, 30, 40, seed=1, out_dir=str(tmp_path))
    sizes = {"train": 400, "valid": 30, "test": 40}
    for (split, lang), path in paths.items():
        lines = read(path)
        assert len(lines) == sizes[split]
        assert all(line and line == " ".join(line.split()) for line in lines)
    for split in sizes:
        assert all(3 <= len(line.split()) <= 10 for line in read(paths[(split, "en")]))
    en = {s: set(read(paths[(s, "en")])) for s in sizes}
    assert len(en["train"]) == 400  # distinct sentences
    assert not en["train"] & en["test"] and not en["train"] & en["valid"]
    assert not en["valid"] & en["test"]


def test_copying_the_source_scores_low_bleu(tmp_path):
    import sacrebleu
    paths = sc.generate(200, 200, 200, seed=1, out_dir=str(tmp_path))
    for split in ("valid", "test"):
        src = read(paths[(split, "en")])
        for lang in sc.TARGETS:
            ref = read(paths[(split, lang)])
            assert ref != src
            bleu = sacrebleu.corpus_bleu(src, [ref]).score
            assert bleu < 10, f"copying en as {lang} scores {bleu:.1f} BLEU on {split}"


def test_rules_render_each_language():
    clause = {"subj": np("the", "dog", adj="big"), "verb": entry("VT", "sees"),
              "obj": np("two", "car", col="red", plural=True),
              "prep": entry("P", "near"), "pobj": np("a", "apple"), "adv": entry("ADV", "today")}
    assert sc.render(clause, "en") == "the big dog sees two red cars near an apple today"
    # xa: adjectives after the noun, plural particle "li" after the noun
    assert sc.render(clause, "xa") == "lo kane grando vide dua karo li roso prope un melo oje"
    # xb: SOV, object particle "wo", postposition, plural "mo" before the noun
    assert sc.render(clause, "xb") == \
        "za ookii inu nii akai mo kuruma wo hito ringo chika kyo miru"
    # xc: verb first, noun phrases reversed, plural suffix -ek
    assert sc.render(clause, "xc") == "vid pes velik ten vuzek kras dva bliz yabl jed sevod"

    plural_subject = {"subj": np("these", "child", plural=True), "verb": entry("VI", "sleeps"),
                      "obj": None, "prep": None, "pobj": None, "adv": None}
    assert sc.render(plural_subject, "en") == "these children sleep"
    assert sc.render(plural_subject, "xa") == "esti nino li dorme"
    assert sc.render(plural_subject, "xb") == "korera mo kodomo nemuru"
    assert sc.render(plural_subject, "xc") == "spiat ditek toti"  # verb agrees: -at


def test_lexicon_words_are_unique_and_never_english():
    english = {form for entries in sc.LEXICON.values() for forms, _ in entries for form in forms}
    assert len({forms[0] for entries in sc.LEXICON.values() for forms, _ in entries}) == 57
    for lang in sc.TARGETS:
        words = [t[lang] for entries in sc.LEXICON.values() for _, t in entries]
        assert len(words) == len(set(words)), lang
        assert not set(words) & english, lang


def test_cli_writes_files(tmp_path, capsys):
    sc.main(["--out", str(tmp_path), "--train", "50", "--valid", "5", "--test", "5"])
    assert len(read(tmp_path / "train.xc")) == 50 and len(read(tmp_path / "test.en")) == 5
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="n_valid must be >= 1"):
        sc.main(["--out", str(tmp_path), "--valid", "0"])


def test_cli_binarizes_only_the_targets_asked(tmp_path, monkeypatch):
    from data_prep import pipeline
    seen = {}
    monkeypatch.setattr(pipeline, "run", lambda name, raw, dest, **kw: seen.update(raw))
    sc.main(["--out", str(tmp_path), "--train", "20", "--valid", "3", "--test", "3", "--binarize",
             str(tmp_path / "bin"), "--targets", "xb"])
    assert set(seen) == {"train", "valid", "test"}
    assert {(p.src, p.tgt, p.tgt_path) for p in seen["test"]} == {("en", "xb", str(tmp_path / "test.xb"))}
    sc.main(["--out", str(tmp_path), "--train", "20", "--valid", "3", "--test", "3", "--binarize",
             str(tmp_path / "bin")])
    assert [p.tgt for p in seen["train"]] == ["xa", "xb", "xc"]
    for bad in ("xd", "xa,xa", ""):
        with pytest.raises(SystemExit):
            sc.main(["--out", str(tmp_path), "--binarize", str(tmp_path / "bin"), "--targets", bad])
