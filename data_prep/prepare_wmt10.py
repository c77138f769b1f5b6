"""WMT-10 (English <-> fr cs de fi lv et ro hi tr gu, after Wang et al. 2020) -> one data-bin.

Wang, Zhai, Hassan Awadalla. "Multi-task Learning for Multilingual Neural Machine Translation",
EMNLP 2020: 10 language pairs from past WMT news tasks, 20 directions to/from English.

Expected --raw-dir layout (you assemble it; plain text or .gz, one sentence a line, line-aligned)::

    {raw-dir}/train.fr-en.fr   {raw-dir}/train.fr-en.en
    {raw-dir}/valid.fr-en.fr   {raw-dir}/valid.fr-en.en
    {raw-dir}/test.fr-en.fr    {raw-dir}/test.fr-en.en
    ... the same for cs de fi lv et ro hi tr gu ({split}.{xx}-en.{xx} and {split}.{xx}-en.en)

train = all WMT training corpora of that year's task concatenated; valid/test = the news sets in
WMT_10 below, as plain text (e.g. `sacrebleu -t wmt18 -l cs-en --echo src > test.cs-en.cs` and
`--echo ref > test.cs-en.en`). `--download` prints the public URLs per language.

This layout is the old interface, kept working: it is handed to moe-prepare (data_prep/prepare.py)
as --pairs. `moe-prepare --wmt10` fetches the corpora itself (fetch_wmt10, with mtdata) and reads
every format they come in. Each xx-en pair is binarized once and serves both xx->en and en->xx.
"""

import argparse
import importlib.util
import os
import subprocess
import sys

from data_prep import pipeline
from data_prep.parallel_files import DataPrepError, Pair, find_raw_file

# language: (WMT task year, valid set, test set, sacrebleu valid, sacrebleu test,
#            approx. bitext size in Wang et al. 2020, main training corpora URLs)
# Corpus URLs are the ones the WMT task pages linked; check https://www.statmt.org/wmtYY/
# translation-task.html for the full list and licences (CzEng and HindEnCorp need a sign-up).
EP9 = "https://www.statmt.org/europarl/v9/training/europarl-v9.{}-en.tsv.gz"
PC3 = "https://s3.amazonaws.com/web-language-models/paracrawl/release3/en-{}.bicleaner07.tmx.gz"
NC14 = "http://data.statmt.org/news-commentary/v14/training/news-commentary-v14.{}-en.tsv.gz"
WT1 = "http://data.statmt.org/wikititles/v1/wikititles-v1.{}-en.tsv.gz"
CC13 = "https://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz"
WMT_10 = {
    "fr": (2015, "newstest2013", "newsdiscusstest2015", "wmt13", "wmt15", "10M", [
        "https://www.statmt.org/europarl/v7/fr-en.tgz", CC13,
        "https://www.statmt.org/wmt13/training-parallel-un.tgz",
        "https://www.statmt.org/wmt15/training-parallel-nc-v10.tgz",
        "https://www.statmt.org/wmt10/training-giga-fren.tar"]),
    "cs": (2019, "newstest2016", "newstest2018", "wmt16", "wmt18", "10M", [
        EP9.format("cs"), PC3.format("cs"), CC13, NC14.format("cs"), WT1.format("cs"),
        "https://ufal.mff.cuni.cz/czeng/czeng17 (registration)"]),
    "de": (2019, "newstest2016", "newstest2018", "wmt16", "wmt18", "4.6M", [
        EP9.format("de"), PC3.format("de"), CC13, NC14.format("de"), WT1.format("de"),
        "https://s3-eu-west-1.amazonaws.com/tilde-model/rapid2019.de-en.zip"]),
    "fi": (2019, "newstest2016", "newstest2018", "wmt16", "wmt18", "4.8M", [
        EP9.format("fi"), PC3.format("fi"), WT1.format("fi")]),
    "lv": (2017, "newsdev2017", "newstest2017", "wmt17/dev", "wmt17", "1.4M", [
        "http://data.statmt.org/wmt17/translation-task/training-parallel-ep-v8.tgz",
        "http://data.statmt.org/wmt17/translation-task/rapid2016.tgz",
        "http://data.statmt.org/wmt17/translation-task/leta.v1.tgz",
        "http://data.statmt.org/wmt17/translation-task/dcep.lv-en.v1.tgz",
        "http://data.statmt.org/wmt17/translation-task/books.lv-en.v1.tgz"]),
    "et": (2018, "newsdev2018", "newstest2018", "wmt18/dev", "wmt18", "0.7M", [
        "http://data.statmt.org/wmt18/translation-task/training-parallel-ep-v8.tgz",
        "https://s3.amazonaws.com/web-language-models/paracrawl/release1/"
        "paracrawl-release1.en-et.zipporah0-dedup-clean.tgz",
        "http://data.statmt.org/wmt18/translation-task/rapid2016.tgz"]),
    "ro": (2016, "newsdev2016", "newstest2016", "wmt16/dev", "wmt16", "0.5M", [
        "http://data.statmt.org/wmt16/translation-task/training-parallel-ep-v8.tgz",
        "https://opus.nlpl.eu/download.php?f=SETIMES/v2/moses/en-ro.txt.zip"]),
    "hi": (2014, "newsdev2014", "newstest2014", None, "wmt14/full", "0.26M", [
        "https://lindat.mff.cuni.cz/repository/xmlui/handle/11858/00-097C-0000-0023-625F-0 "
        "(HindEnCorp 0.5)"]),
    "tr": (2018, "newstest2016", "newstest2018", "wmt16", "wmt18", "0.18M", [
        "https://opus.nlpl.eu/download.php?f=SETIMES/v2/moses/en-tr.txt.zip"]),
    "gu": (2019, "newsdev2019", "newstest2019", "wmt19/dev", "wmt19", "0.08M", [
        "http://data.statmt.org/wmt19/translation-task/bible.gu-en.tsv.gz",
        "http://data.statmt.org/wmt19/translation-task/wikipedia.gu-en.tsv.gz",
        "http://data.statmt.org/wmt19/translation-task/govin-clean.gu-en.tsv.gz",
        WT1.format("gu")]),
}
LANGS = tuple(WMT_10)

# What `moe-prepare --wmt10` fetches with mtdata (`mtdata list -l xxx-eng` shows the ids):
# language: (ISO 639-3 code, train corpora, valid set, test set). The corpora are the freely
# downloadable ones of WMT_10's lists above; CzEng and HindEnCorp need a sign-up and are not
# in mtdata, so cs and hi come out smaller than in the paper. fr is tested on newstest2014
# (newsdiscusstest2015 is not in mtdata) and hi is validated on IITB's dev set (newsdev2014).
WMT10_MTDATA = {
    "fr": ("fra", ["Statmt-europarl-7-fra-eng", "Statmt-commoncrawl_wmt13-1-fra-eng",
                   "Statmt-news_commentary-14-eng-fra"],
           "Statmt-newstest-2013-eng-fra", "Statmt-newstest_fren-2014-fra-eng"),
    "cs": ("ces", ["Statmt-europarl-9-ces-eng", "ParaCrawl-paracrawl-3-eng-ces",
                   "Statmt-commoncrawl_wmt13-1-ces-eng", "Statmt-news_commentary-14-ces-eng",
                   "Statmt-wiki_titles-1-ces-eng"],
           "Statmt-newstest_csen-2016-ces-eng", "Statmt-newstest_csen-2018-ces-eng"),
    "de": ("deu", ["Statmt-europarl-9-deu-eng", "ParaCrawl-paracrawl-3-eng-deu",
                   "Statmt-commoncrawl_wmt13-1-deu-eng", "Statmt-news_commentary-14-deu-eng",
                   "Statmt-wiki_titles-1-deu-eng", "Tilde-rapid-2019-deu-eng"],
           "Statmt-newstest_deen-2016-deu-eng", "Statmt-newstest_deen-2018-deu-eng"),
    "fi": ("fin", ["Statmt-europarl-9-fin-eng", "ParaCrawl-paracrawl-3-eng-fin",
                   "Statmt-wiki_titles-1-fin-eng"],
           "Statmt-newstest_fien-2016-fin-eng", "Statmt-newstest_fien-2018-fin-eng"),
    "lv": ("lav", ["Statmt-europarl-7-lav-eng", "Tilde-rapid-2016-eng-lav"],
           "Statmt-newsdev_lven-2017-lav-eng", "Statmt-newstest_lven-2017-lav-eng"),
    "et": ("est", ["Statmt-europarl-7-est-eng", "Tilde-rapid-2016-eng-est"],
           "Statmt-newsdev_eten-2018-est-eng", "Statmt-newstest_eten-2018-est-eng"),
    "ro": ("ron", ["Statmt-europarl-7-ron-eng", "OPUS-setimes-v2-eng-ron"],
           "Statmt-newsdev_roen-2016-ron-eng", "Statmt-newstest_roen-2016-ron-eng"),
    "hi": ("hin", ["Statmt-news_commentary-14-eng-hin", "Statmt-pmindia-1-eng-hin"],
           "IITB-hien_dev-1.5-hin-eng", "Statmt-newstest_hien-2014-hin-eng"),
    "tr": ("tur", ["OPUS-setimes-v2-eng-tur"],
           "Statmt-newstest_tren-2016-tur-eng", "Statmt-newstest_tren-2018-tur-eng"),
    "gu": ("guj", ["Statmt-wiki_titles-1-guj-eng", "Statmt-pmindia-1-eng-guj"],
           "Statmt-newsdev_guen-2019-guj-eng", "Statmt-newstest_guen-2019-guj-eng"),
}
# how mtdata is run: its command line, in this Python (tests replace it; nothing else does)
MTDATA_CMD = [sys.executable, "-m", "mtdata"]


def fetch_wmt10(download_dir, langs):
    """Fetches WMT-10 with mtdata into download_dir/{xx}-en/ (the only network access of
    data_prep). A language whose directory already holds train, dev and test is not fetched
    again. Raises DataPrepError in one line: mtdata missing, or mtdata failing (no network)."""
    if MTDATA_CMD[1:3] == ["-m", "mtdata"] and importlib.util.find_spec("mtdata") is None:
        raise DataPrepError("--wmt10 needs the mtdata package: pip install .[data] (or fetch the "
                            "corpora yourself and use --layout mtdata DIR or --pairs)")
    for lang in langs:
        iso3, train, dev, test = WMT10_MTDATA[lang]
        out = os.path.join(download_dir, f"{lang}-en")
        if all(os.path.exists(os.path.join(out, f"{stem}.eng")) for stem in ("train", "dev", "test1")):
            continue
        argv = [*MTDATA_CMD, "get", "-l", f"{iso3}-eng", "--merge", "-tr", *train, "-dv", dev,
                "-ts", test, "-o", out]
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            lines = [line for line in proc.stdout.splitlines() if line.strip()]
            last = lines[-1].strip() if lines else f"exit {proc.returncode}"
            raise DataPrepError(f"--wmt10: mtdata could not fetch {lang}-en ({last}); check the "
                                f"network, or fetch with mtdata yourself and use --layout mtdata")


def download_instructions(langs):
    """The per-language source list printed by --download (no network access)."""
    lines = []
    for lang in langs:
        year, valid, test, sb_valid, sb_test, size, urls = WMT_10[lang]
        lines.append(f"== {lang}-en  (WMT{year % 100} training data, ~{size} pairs; "
                     f"https://www.statmt.org/wmt{year % 100}/translation-task.html)")
        lines += [f"  train: {u}" for u in urls]
        for split, name, sb in (("valid", valid, sb_valid), ("test", test, sb_test)):
            how = (f"sacrebleu -t {sb} -l {lang}-en --echo src > {split}.{lang}-en.{lang}; "
                   f"sacrebleu -t {sb} -l {lang}-en --echo ref > {split}.{lang}-en.en"
                   if sb else f"not in sacrebleu: extract {name}-{lang}en-*.sgm from "
                   f"https://www.statmt.org/wmt{year % 100}/dev.tgz")
            lines.append(f"  {split}: {name}: {how}")
    return "\n".join(lines)


def raw_pairs(raw_dir, langs):
    """{split: [Pair(xx, en)]}; a missing file gives an error naming the directory and names."""
    return {split: [Pair(lang, "en", find_raw_file(raw_dir, split, lang, "en", lang),
                         find_raw_file(raw_dir, split, lang, "en", "en")) for lang in langs]
            for split in pipeline.SPLITS}


def build_arg_parser():
    p = argparse.ArgumentParser(
        prog="data_prep/prepare_wmt10.sh",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="WMT-10 (English <-> fr cs de fi lv et ro hi tr gu; Wang et al. 2020) -> "
                    "clean -> joint sentencepiece -> fairseq-preprocess of all 20 directions into "
                    "ONE data-bin with a shared dictionary.",
        epilog="expected --raw-dir layout (plain or .gz, line-aligned):\n"
               "  {split}.{xx}-en.{xx} and {split}.{xx}-en.en\n"
               "  for split in train valid test, xx in " + " ".join(LANGS) + "\n"
               "run with --download to see where each corpus comes from.")
    p.add_argument("--raw-dir", help="directory with the layout below (required unless --download)")
    p.add_argument("--download", action="store_true",
                   help="print the public URLs of the training corpora and the valid/test sets "
                        "per language, then exit (nothing is fetched)")
    p.add_argument("--languages", default=",".join(LANGS),
                   help="comma-separated subset of " + ",".join(LANGS) + " (default: all)")
    p.add_argument("--destdir", default="data-bin/wmt10", help="output (data-bin/wmt10)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --destdir")
    pipeline.add_common_args(p, default_vocab_size=64000, default_spm_sentences=2_000_000)
    return p


def moe_prepare_argv(args, langs):
    """This script's flags as moe-prepare's (train pairs are always deduplicated there)."""
    specs = [f"{split}:{p.src}-{p.tgt}:{p.src_path},{p.tgt_path}"
             for split, pairs in raw_pairs(args.raw_dir, langs).items() for p in pairs]
    argv = ["--pairs", *specs, "--out", args.destdir, "--spm-vocab-size", str(args.vocab_size),
            "--spm-sample-size", str(args.spm_input_sentence_size), "--max-len", str(args.max_len),
            "--max-ratio", str(args.max_ratio), "--workers", str(args.workers)]
    if args.max_train_sentences is not None:
        argv += ["--max-train-sentences", str(args.max_train_sentences)]
    if args.fairseq_preprocess:
        argv += ["--fairseq-preprocess", args.fairseq_preprocess]
    return argv + (["--force"] if args.force else [])


def main(argv=None):
    args = build_arg_parser().parse_args(argv)
    try:
        langs = [lang.strip() for lang in args.languages.split(",") if lang.strip()]
        bad = [lang for lang in langs if lang not in WMT_10]
        if bad or not langs:
            raise DataPrepError(f"--languages: unknown {' '.join(bad) or '(none given)'} "
                                f"(choose from {','.join(LANGS)})")
        if args.download:
            print(download_instructions(langs))
            return
        if not args.raw_dir:
            raise DataPrepError("--raw-dir is required (see --help for the layout, --download "
                                "for where to get the data)")
        from data_prep.prepare import prepare  # moe-prepare imports this module

        prepare(moe_prepare_argv(args, langs))
    except DataPrepError as e:
        sys.exit(f"prepare_wmt10: error: {e}")


if __name__ == "__main__":
    main()
