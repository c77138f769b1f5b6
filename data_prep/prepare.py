"""moe-prepare: real parallel corpora -> one multilingual data-bin for translation_multi_moe.

    moe-prepare --layout opus100 ROOT --directions en-xx --out data-bin/opus100
    moe-prepare --wmt10 --out data-bin/wmt10
    moe-prepare --pairs train:de-en:europarl.tsv.gz train:de-en:nc.de,nc.en \\
                --pairs valid:de-en:dev.de,dev.en test:de-en:newstest-src.de.sgm,newstest-ref.en.sgm \\
                --out data-bin/mine

Steps (data_prep/pipeline.py): read every source (data_prep/readers.py), clean, deduplicate the
train pairs, drop every train pair with a side found in any valid or test set, train one joint
sentencepiece model on a temperature-balanced sample (data_prep/sampling.py), encode, binarize
with one joint dictionary. The output is built in a hidden directory beside --out and renamed
to --out only when complete, with manifest.json (counts per direction and step, sentencepiece
settings, sha256 of every source file, the command line). See docs/data.md.
"""

import argparse
import datetime
import hashlib
import os
import shlex
import shutil
import sys

from data_prep import layouts, pipeline
from data_prep.parallel_files import DataPrepError
from data_prep.prepare_wmt10 import LANGS as WMT10_LANGS, fetch_wmt10

PIVOT = "en"
LAYOUTS = ("opus100", "flores", "mtdata")
MANIFEST_VERSION = 1


def build_parser():
    p = argparse.ArgumentParser(
        prog="moe-prepare", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Real parallel corpora (OPUS-100, WMT-10 via mtdata, your own files; FLORES "
                    "for evaluation) -> cleaned, deduplicated, held-out-free text -> one joint "
                    "sentencepiece model -> ONE fairseq data-bin for --task translation_multi_moe.",
        epilog="sources (combine them freely; FLORES replaces the valid/test sets of the "
               "languages it has):\n"
               "  --pairs SPLIT:SRC-TGT:FILE[,FILE]  SPLIT train|valid|test; FILE is SRC_FILE,TGT_FILE\n"
               "        (plain, .gz, WMT .sgm) or one .tsv (SRC<TAB>TGT) or .tmx\n"
               "  --layout opus100 ROOT   opus-100-corpus/v1.0/supervised/{xx}-en/opus.{xx}-en-{split}.{lang}\n"
               "  --layout flores ROOT    flores200_dataset/{dev,devtest}/{code}.{split} (valid, test)\n"
               "  --layout mtdata DIR     `mtdata get ... -o DIR` output: DIR/train.{xxx}, dev.*, test1.*\n"
               "  --wmt10                 fetch WMT-10 with mtdata (pip install .[data]), then as mtdata\n"
               "see docs/data.md")
    src = p.add_argument_group("sources")
    src.add_argument("--pairs", nargs="+", action="extend", default=[], metavar="SPLIT:SRC-TGT:FILES",
                     help="explicit files of one split and direction (repeatable)")
    src.add_argument("--layout", nargs=2, action="append", default=[], metavar=("NAME", "ROOT"),
                     help=f"a released corpus tree; NAME one of {', '.join(LAYOUTS)} (repeatable)")
    src.add_argument("--wmt10", action="store_true",
                     help="fetch the WMT-10 corpora (English <-> " + " ".join(WMT10_LANGS) +
                          ") with the mtdata package into --download-dir, then prepare them")
    src.add_argument("--download-dir", default="wmt10-mtdata",
                     help="--wmt10: where mtdata writes (default ./wmt10-mtdata; reused if present)")
    src.add_argument("--langs", help="only these non-English languages, e.g. de,fr (default: all "
                                     "the sources have)")
    src.add_argument("--lang-map", help="language codes to the project's, e.g. deu_Latn=de,lvs_Latn=lv "
                                        "(FLORES and mtdata codes; common ones are built in)")
    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, help="the data-bin directory to create")
    out.add_argument("--directions", default="both", choices=("xx-en", "en-xx", "both"),
                     help="xx-en (many-to-English), en-xx (English-to-many) or both (default)")
    out.add_argument("--force", action="store_true", help="replace a non-empty --out")
    out.add_argument("--keep-work", action="store_true",
                     help="keep --out/work (cleaned train text, sentencepiece sample)")
    spm = p.add_argument_group("sentencepiece")
    spm.add_argument("--spm-vocab-size", type=int, default=32000, help="joint vocabulary (32000)")
    spm.add_argument("--spm-character-coverage", type=float, default=1.0,
                     help="share of characters the vocabulary covers (1.0; 0.9995 is advised with "
                          "large scripts such as Chinese or Japanese)")
    spm.add_argument("--spm-sample-size", type=int, default=2_000_000,
                     help="sentences in the balanced sample sentencepiece trains on (2000000)")
    spm.add_argument("--spm-model-type", default="unigram", choices=("unigram", "bpe"))
    spm.add_argument("--temperature", type=float, default=5.0,
                     help="the sample's language shares are n^(1/T): use the --sampling-temperature "
                          "of your training config (5 in configs/wmt10 and configs/opus100)")
    cln = p.add_argument_group("cleaning and binarizing")
    cln.add_argument("--max-len", type=int, default=250,
                     help="drop train pairs with a side over this many words (250)")
    cln.add_argument("--max-ratio", type=float, default=3.0,
                     help="drop train pairs with a word-length ratio over this (3.0)")
    cln.add_argument("--max-train-sentences", type=int,
                     help="keep only the first N train pairs per direction (quick runs)")
    cln.add_argument("--seed", type=int, default=1, help="sample and sentencepiece seed (1)")
    cln.add_argument("--workers", type=int, default=2, help="fairseq-preprocess --workers (2)")
    cln.add_argument("--fairseq-preprocess", help="command to run fairseq-preprocess "
                                                  "(default: beside this Python, else PATH)")
    return p


def check_args(args):
    for flag, value, ok, allowed in (
            ("--spm-vocab-size", args.spm_vocab_size, args.spm_vocab_size >= 10, ">= 10"),
            ("--spm-character-coverage", args.spm_character_coverage,
             0 < args.spm_character_coverage <= 1, "in (0, 1], e.g. 1.0 or 0.9995"),
            ("--spm-sample-size", args.spm_sample_size, args.spm_sample_size >= 1, ">= 1"),
            ("--temperature", args.temperature, args.temperature > 0, "> 0"),
            ("--max-len", args.max_len, args.max_len >= 1, ">= 1"),
            ("--max-ratio", args.max_ratio, args.max_ratio >= 1, ">= 1"),
            ("--workers", args.workers, args.workers >= 1, ">= 1")):
        if not ok:
            raise DataPrepError(f"{flag}: {value} is not allowed (must be {allowed})")
    for name, _ in args.layout:
        if name not in LAYOUTS:
            raise DataPrepError(f"--layout: '{name}' is not one of {', '.join(LAYOUTS)}")
    if not (args.pairs or args.layout or args.wmt10):
        raise DataPrepError("no source: give --pairs, --layout NAME ROOT or --wmt10")


def collect_sources(args):
    """{split: [Pair]} from every source; FLORES's valid/test replace the others' for its
    languages."""
    langs = set(args.langs.split(",")) if args.langs else None
    lang_map = layouts.parse_lang_map(args.lang_map)
    found, evaluation = [], []
    for name, root in args.layout:
        if name == "opus100":
            found.append(layouts.opus100(root, langs))
        elif name == "mtdata":
            found.append(layouts.mtdata(root, langs, lang_map))
        else:
            evaluation.append(layouts.flores(root, langs, lang_map))
    if args.wmt10:
        wanted = sorted(langs) if langs else list(WMT10_LANGS)
        unknown = sorted(set(wanted) - set(WMT10_LANGS))
        if unknown:
            raise DataPrepError(f"--langs: {','.join(unknown)} is not a WMT-10 language "
                                f"({','.join(WMT10_LANGS)})")
        fetch_wmt10(args.download_dir, wanted)
        found.append(layouts.mtdata(args.download_dir, langs, lang_map))
    if args.pairs:
        found.append(layouts.parse_pairs(args.pairs))
    merged = {}
    for source in found:
        for split, pairs in source.items():
            merged.setdefault(split, []).extend(pairs)
    for source in evaluation:
        for split, pairs in source.items():
            covered = {frozenset((p.src, p.tgt)) for p in pairs}
            merged[split] = [p for p in merged.get(split, [])
                             if frozenset((p.src, p.tgt)) not in covered] + pairs
    if not merged.get("train"):
        raise DataPrepError("no train data: --layout flores is for evaluation only; add "
                            "--pairs train:..., --layout opus100|mtdata or --wmt10")
    trained = {frozenset((p.src, p.tgt)) for p in merged["train"]}
    # evaluation sets of languages with no train data cannot be binarized against this model
    return {split: [p for p in pairs if frozenset((p.src, p.tgt)) in trained]
            for split, pairs in merged.items() if split == "train" or pairs}


def orient(raw_pairs, directions):
    """Every pair with English as (en, xx) for en-xx, else as (xx, en); others as given.

    One binarized pair serves both directions (fairseq falls back to {tgt}-{src} files)."""
    def one(p):
        if PIVOT not in (p.src, p.tgt):
            return p
        want_en_first = directions == "en-xx"
        return p if (p.src == PIVOT) == want_en_first else p.reversed()
    return {split: [one(p) for p in pairs] for split, pairs in raw_pairs.items()}


def lang_pairs(pairs, directions):
    out = []
    for s, t in pairs:
        if directions == "both" or PIVOT not in (s, t):
            out += [f"{s}-{t}", f"{t}-{s}"] if directions == "both" else [f"{s}-{t}"]
        else:
            out.append(f"{s}-{t}")
    return out


def sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def step_counts(stats):
    """A CleanStats dict -> the sentence count after each step of the pipeline."""
    cleaned = stats["read"] - stats["empty"] - stats["too_long"] - stats["ratio"] - stats["over_limit"]
    deduplicated = cleaned - stats["duplicate"]
    return {"read": stats["read"], "cleaned": cleaned, "deduplicated": deduplicated,
            "held_out_removed": deduplicated - stats["overlap"], "kept": stats["kept"]}


def build_manifest(args, argv, raw_pairs, report, directions):
    per_pair = report["counts"]
    counts = {}
    for direction in directions:
        s, t = direction.split("-")
        pair_counts = per_pair.get(f"{s}-{t}") or per_pair[f"{t}-{s}"]
        counts[direction] = {split: (step_counts(st) if split == "train" else {"read": st["read"]})
                             for split, st in pair_counts.items()}
    files = sorted({os.path.abspath(path) for pairs in raw_pairs.values() for p in pairs
                    for path in (p.src_path, p.tgt_path)})
    return {
        "version": MANIFEST_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["moe-prepare", *argv]),
        "directions": directions,
        "languages": sorted({lang for d in directions for lang in d.split("-")}),
        "counts": counts,
        "sentencepiece": report["sentencepiece"],
        "cleaning": {"max_len": args.max_len, "max_ratio": args.max_ratio,
                     "max_train_sentences": args.max_train_sentences, "dedup": True,
                     "held_out_removed_from_train": True},
        "sources": [{"path": path, "sha256": sha256(path), "bytes": os.path.getsize(path)}
                    for path in files],
    }


def _refuse_existing(out, force):
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise DataPrepError(f"--out {out} exists and is not empty: choose another --out, or add "
                            "--force to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataPrepError(f"--out {out} exists and is not a directory")


def prepare(argv=None):
    """Runs moe-prepare; returns the manifest. Raises DataPrepError on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    check_args(args)
    out = os.path.abspath(args.out)
    _refuse_existing(out, args.force)
    raw_pairs = orient(collect_sources(args), args.directions)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    stage = os.path.join(parent, f".{name}.moe-prepare-{os.getpid()}.partial")
    shutil.rmtree(stage, ignore_errors=True)
    report = {}
    try:
        pipeline.run("moe-prepare", raw_pairs, stage, vocab_size=args.spm_vocab_size,
                     spm_input_sentence_size=args.spm_sample_size,
                     max_train_sentences=args.max_train_sentences, max_len=args.max_len,
                     max_ratio=args.max_ratio, dedup=True, workers=args.workers,
                     fairseq_preprocess=args.fairseq_preprocess, seed=args.seed,
                     spm_model_type=args.spm_model_type, remove_overlap=True,
                     temperature=args.temperature,
                     character_coverage=args.spm_character_coverage, report=report,
                     announce=False)
        pairs = pipeline.unique_pairs([(p.src, p.tgt) for p in raw_pairs["train"]])
        manifest = build_manifest(args, argv, raw_pairs, report, lang_pairs(pairs, args.directions))
        if not args.keep_work:
            shutil.rmtree(os.path.join(stage, "work"))
        _write_json(os.path.join(stage, "manifest.json"), manifest)
        _replace_dir(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone after a success's rename
    print(f"moe-prepare: wrote {out}; train with: --task translation_multi_moe "
          f"--lang-pairs {','.join(manifest['directions'])}", flush=True)
    return manifest


def _write_json(path, obj):
    from moe_fairseq.atomic_files import atomic_write_json

    atomic_write_json(path, obj, indent=2)


def _replace_dir(stage, out):
    """Moves the finished stage to out; an old out (--force) is removed only after that."""
    old = None
    if os.path.exists(out):
        old = f"{os.path.dirname(out)}/.{os.path.basename(out)}.moe-prepare-{os.getpid()}.old"
        os.rename(out, old)
    os.rename(stage, out)
    if old:
        shutil.rmtree(old)


def cli_main():
    from moe_fairseq.console import quiet_third_party_warnings

    quiet_third_party_warnings()
    try:
        prepare()
    except DataPrepError as e:
        sys.exit(f"moe-prepare: error: {e}")


if __name__ == "__main__":
    cli_main()
