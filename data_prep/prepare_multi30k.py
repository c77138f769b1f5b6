"""Multi30k (task 1: en, de, fr, cs) -> one multilingual fairseq data-bin directory.

Raw layout (as in github.com/multi30k/dataset, data/task1/raw/): {split}.{lang}.gz, one sentence
a line, line i of every language is the same sentence. Splits: train (29,000), val (1,014),
test_2016_flickr (1,000); they become fairseq's train / valid / test.

Reads ../shared/data/multi30k (beside the checkout) unless --raw-dir is given; downloads only with
--download. See `python -m data_prep.prepare_multi30k --help` and data_prep/pipeline.py.
"""

import argparse
import os
import sys
import urllib.request

from data_prep import pipeline
from moe_fairseq.atomic_files import atomic_outputs
from data_prep.parallel_files import DataPrepError, Pair

LANGS = ("en", "de", "fr", "cs")
SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}  # fairseq name -> file
URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/{split}.{lang}.gz"
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RAW_DIR = os.path.normpath(os.path.join(REPO_DIR, "..", "shared", "data", "multi30k"))


def download(raw_dir, langs, log=print):
    """Fetches the raw files that are not yet in raw_dir (each written atomically)."""
    os.makedirs(raw_dir, exist_ok=True)
    for split in SPLITS.values():
        for lang in langs:
            path = os.path.join(raw_dir, f"{split}.{lang}.gz")
            if os.path.isfile(path):
                continue
            url = URL.format(split=split, lang=lang)
            log(f"download {url}")
            try:
                with atomic_outputs([path], "wb", hidden=True) as (out,), \
                        urllib.request.urlopen(url, timeout=60) as r:
                    out.write(r.read())
            except OSError as e:
                raise DataPrepError(f"--download: cannot fetch {url} ({e})") from None


def raw_pairs(raw_dir, directions):
    """{fairseq split: [Pair]} for the requested directions; errors name the missing file."""
    out = {}
    for split, fname in SPLITS.items():
        out[split] = []
        for src, tgt in directions:
            paths = [os.path.join(raw_dir, f"{fname}.{lang}.gz") for lang in (src, tgt)]
            for path in paths:
                if not os.path.isfile(path):
                    raise DataPrepError(f"{path}: missing Multi30k file "
                                        "(point --raw-dir at the raw files, or add --download)")
            out[split].append(Pair(src, tgt, *paths))
    return out


def build_arg_parser():
    p = argparse.ArgumentParser(
        prog="data_prep/prepare_multi30k.sh",
        description="Multi30k (en de fr cs) -> cleaned text -> one joint sentencepiece model -> "
                    "fairseq-preprocess into ONE data-bin usable by translation_multi_simple_epoch.",
        epilog="Raw files: {raw-dir}/{train,val,test_2016_flickr}.{en,de,fr,cs}.gz. Nothing is "
               "downloaded unless --download is given.")
    p.add_argument("--raw-dir", help=f"directory of raw .gz files (default {DEFAULT_RAW_DIR}; "
                                     "with --download: {destdir}/download)")
    p.add_argument("--download", action="store_true",
                   help="fetch missing raw files from github.com/multi30k/dataset into --raw-dir")
    p.add_argument("--destdir", default="data-bin/multi30k", help="output (data-bin/multi30k)")
    p.add_argument("--directions", default="en-de,en-fr,en-cs",
                   help="comma-separated, from en de fr cs (default en-de,en-fr,en-cs)")
    pipeline.add_common_args(p, default_vocab_size=8000)
    return p


def main(argv=None):
    args = build_arg_parser().parse_args(argv)
    try:
        directions = pipeline.parse_directions(args.directions)
        for lang in {lang for d in directions for lang in d}:
            if lang not in LANGS:
                raise DataPrepError(f"--directions: '{lang}' is not a Multi30k language "
                                    f"({' '.join(LANGS)})")
        raw_dir = args.raw_dir or (os.path.join(args.destdir, "download") if args.download
                                   else DEFAULT_RAW_DIR)
        if args.download:
            download(raw_dir, sorted({lang for d in directions for lang in d}))
        pipeline.run_from_args("multi30k", raw_pairs(raw_dir, directions), args)
    except DataPrepError as e:
        sys.exit(f"prepare_multi30k: error: {e}")


if __name__ == "__main__":
    main()
