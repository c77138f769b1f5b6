"""The pipeline shared by the recipes: clean -> joint sentencepiece -> encode -> binarize.

A recipe (prepare_multi30k, prepare_wmt10) only finds its raw files and calls `run`. Result::

    {destdir}/spm.model, spm.vocab       one joint sentencepiece model for all languages
    {destdir}/dict.txt                   the shared fairseq dictionary (= every dict.{lang}.txt)
    {destdir}/{split}.{src}-{tgt}.{lang}.bin/.idx, dict.{lang}.txt    from fairseq-preprocess
    {destdir}/langs.txt                  one language a line (for --lang-dict)
    {destdir}/raw/{split}.{src}-{tgt}.{lang}   valid/test text, cleaned but not encoded
                                               (sacrebleu references and sources to translate)
    {destdir}/work/                      cleaned and encoded train text; can be deleted afterwards

One binarized pair serves both directions: translation_multi_simple_epoch looks for
{split}.{src}-{tgt}.* and falls back to {split}.{tgt}-{src}.*, so en-de files also serve de-en.
Every step writes atomically, so a rerun after an interruption redoes the work correctly.
"""

import os
import shlex
import shutil
import subprocess
import time

from data_prep.parallel_files import (DataPrepError, clean_pairs, encode_file,
                                      parse_direction, train_sentencepiece, write_fairseq_dict)

SPLITS = ("train", "valid", "test")


def add_common_args(parser, default_vocab_size, default_spm_sentences=1_000_000):
    """Flags shared by every recipe."""
    parser.add_argument("--vocab-size", type=int, default=default_vocab_size,
                        help=f"joint sentencepiece vocabulary size (default {default_vocab_size})")
    parser.add_argument("--spm-input-sentence-size", type=int, default=default_spm_sentences,
                        help="sentences sampled to train sentencepiece; bounds its memory "
                             f"(default {default_spm_sentences})")
    parser.add_argument("--max-train-sentences", type=int,
                        help="keep only the first N cleaned train pairs per direction (quick runs)")
    parser.add_argument("--max-len", type=int, default=250,
                        help="drop train pairs with a side over this many words (default 250)")
    parser.add_argument("--max-ratio", type=float, default=3.0,
                        help="drop train pairs with word-length ratio over this (default 3.0)")
    parser.add_argument("--dedup", action="store_true", help="drop repeated train pairs")
    parser.add_argument("--workers", type=int, default=2, help="fairseq-preprocess --workers (2)")
    parser.add_argument("--fairseq-preprocess", default=None,
                        help="command to run fairseq-preprocess (default: from PATH)")


def parse_directions(text):
    """'en-de,en-fr' -> [('en','de'), ('en','fr')]; errors name --directions."""
    dirs = [parse_direction(d.strip()) for d in text.split(",") if d.strip()]
    if not dirs:
        raise DataPrepError("--directions: no direction given")
    return dirs


def unique_pairs(directions):
    """Drops a direction whose reverse is already present: one binarized pair serves both."""
    seen, out = set(), []
    for s, t in directions:
        if frozenset((s, t)) not in seen:
            seen.add(frozenset((s, t)))
            out.append((s, t))
    return out


def preprocess_command(override=None):
    if override:
        return shlex.split(override)
    exe = shutil.which("fairseq-preprocess")
    if exe is None:
        raise DataPrepError("fairseq-preprocess not found on PATH "
                            "(install fairseq, or pass --fairseq-preprocess CMD)")
    return [exe]


class _Log:
    def __init__(self, name):
        self.name, self.t0 = name, time.time()

    def __call__(self, msg):
        print(f"[{self.name} {time.time() - self.t0:6.1f}s] {msg}", flush=True)


def binarize_pair(cmd, src, tgt, text_dir, destdir, dict_path, splits, workers):
    """Runs fairseq-preprocess for one pair into a staging dir, then moves its files to destdir.

    Staging keeps a failed or interrupted fairseq-preprocess from leaving partial .bin/.idx files
    next to good ones; the moves are atomic per file.
    """
    stage = os.path.join(destdir, f".binarize-{src}-{tgt}.tmp")
    shutil.rmtree(stage, ignore_errors=True)  # left over by a killed run
    os.makedirs(stage)
    argv = cmd + ["--source-lang", src, "--target-lang", tgt, "--destdir", stage,
                  "--srcdict", dict_path, "--tgtdict", dict_path, "--workers", str(workers)]
    for split in splits:
        flag = {"train": "--trainpref", "valid": "--validpref", "test": "--testpref"}[split]
        argv += [flag, os.path.join(text_dir, f"{split}.{src}-{tgt}")]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        err_log = os.path.join(destdir, f"preprocess.{src}-{tgt}.error.log")
        with open(err_log, "w", encoding="utf-8") as f:
            f.write(" ".join(shlex.quote(a) for a in argv) + "\n" + proc.stdout)
        shutil.rmtree(stage, ignore_errors=True)
        raise DataPrepError(f"fairseq-preprocess failed for {src}-{tgt} "
                            f"(exit {proc.returncode}); output in {err_log}")
    for name in sorted(os.listdir(stage)):
        target = f"preprocess.{src}-{tgt}.log" if name == "preprocess.log" else name
        os.replace(os.path.join(stage, name), os.path.join(destdir, target))
    os.rmdir(stage)


def _check_no_foreign_pairs(destdir, pairs):
    """Refuses a destdir holding binarized pairs this run would not rebuild.

    The run retrains spm.model and dict.txt; .bin files of other pairs would then silently
    index into the wrong dictionary.
    """
    if not os.path.isdir(destdir):
        return
    ours = {f"{s}-{t}" for s, t in pairs}
    foreign = sorted({name.split(".")[1] for name in os.listdir(destdir)
                      if name.endswith(".bin") and name.count(".") == 3} - ours)
    if foreign:
        raise DataPrepError(f"{destdir} already holds {', '.join(foreign)} from another run, which "
                            "the new dictionary would not match: use another --destdir, or "
                            "include those directions")


def run(name, raw_pairs, destdir, *, vocab_size, spm_input_sentence_size=1_000_000,
        max_train_sentences=None, max_len=250, max_ratio=3.0, dedup=False, workers=2,
        fairseq_preprocess=None, seed=1, spm_model_type="unigram"):
    """Prepares one multilingual data-bin directory.

    raw_pairs: {split: [Pair, ...]} for split in train/valid/test (train required); each Pair
    names the raw source and target file of one language pair (plain or .gz).
    """
    log = _Log(name)
    if "train" not in raw_pairs:
        raise DataPrepError(f"{name}: no train split given")
    splits = [s for s in SPLITS if s in raw_pairs]
    pairs = unique_pairs([(p.src, p.tgt) for p in raw_pairs["train"]])
    for split in splits:
        have = {(p.src, p.tgt) for p in raw_pairs[split]}
        missing = [f"{s}-{t}" for s, t in pairs if (s, t) not in have]
        if missing:
            raise DataPrepError(f"{name}: split {split} has no files for {', '.join(missing)}")
    langs = sorted({lang for pair in pairs for lang in pair})
    cmd = preprocess_command(fairseq_preprocess)  # fail early, before hours of cleaning
    destdir = os.path.abspath(destdir)
    _check_no_foreign_pairs(destdir, pairs)
    work, raw_out = os.path.join(destdir, "work"), os.path.join(destdir, "raw")
    clean_dir, spm_dir = os.path.join(work, "clean"), os.path.join(work, "spm")
    log(f"pairs {', '.join(f'{s}-{t}' for s, t in pairs)}; languages {' '.join(langs)}; "
        f"output {destdir}")

    log("step 1/4: check and clean raw files")
    for split in splits:
        todo = [p for p in raw_pairs[split] if (p.src, p.tgt) in pairs]
        if split == "train":
            stats = clean_pairs(todo, clean_dir, split, max_len=max_len, max_ratio=max_ratio,
                                dedup=dedup, max_sentences=max_train_sentences)
        else:  # never filter evaluation sets: scores must stay comparable with published ones
            stats = clean_pairs(todo, raw_out, split, filter=False)
        for (s, t), st in stats.items():
            log(f"  {split} {s}-{t}: {st.summary()}")
            if st.kept == 0:
                raise DataPrepError(f"{name}: {split} {s}-{t} is empty after cleaning")

    log(f"step 2/4: train joint sentencepiece (vocab {vocab_size}) and write dict.txt")
    # One train file per language: with en-de, en-fr, en-cs the English side would otherwise be
    # sampled three times as often as any other language.
    spm_inputs = {}
    for s, t in pairs:
        for lang in (s, t):
            spm_inputs.setdefault(lang, os.path.join(clean_dir, f"train.{s}-{t}.{lang}"))
    spm_model = train_sentencepiece([spm_inputs[lang] for lang in langs],
                                    os.path.join(destdir, "spm"), vocab_size,
                                    input_sentence_size=spm_input_sentence_size, seed=seed,
                                    model_type=spm_model_type)
    dict_path = os.path.join(destdir, "dict.txt")
    n_dict = write_fairseq_dict(os.path.join(destdir, "spm.vocab"), dict_path)
    log(f"  {spm_model}, {n_dict} dictionary entries")

    log("step 3/4: encode with sentencepiece")
    for split in splits:
        for s, t in pairs:
            for lang in (s, t):
                fname = f"{split}.{s}-{t}.{lang}"
                text_dir = clean_dir if split == "train" else raw_out
                encode_file(spm_model, os.path.join(text_dir, fname), os.path.join(spm_dir, fname))

    log("step 4/4: binarize with fairseq-preprocess")
    for s, t in pairs:
        log(f"  {s}-{t}")
        binarize_pair(cmd, s, t, spm_dir, destdir, dict_path, splits, workers)
    tmp = os.path.join(destdir, ".langs.txt.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(lang + "\n" for lang in langs))
    os.replace(tmp, os.path.join(destdir, "langs.txt"))
    both = [f"{a}-{b}" for s, t in pairs for a, b in ((s, t), (t, s))]
    log(f"done: {destdir}  (translation_multi_simple_epoch: --langs {','.join(langs)} "
        f"--lang-pairs {','.join(both)}); {work} can be deleted")
    return destdir


def run_from_args(name, raw_pairs, args):
    """`run` with the flags of add_common_args (plus the recipe's --destdir)."""
    return run(name, raw_pairs, args.destdir, vocab_size=args.vocab_size,
               spm_input_sentence_size=args.spm_input_sentence_size,
               max_train_sentences=args.max_train_sentences, max_len=args.max_len,
               max_ratio=args.max_ratio, dedup=args.dedup, workers=args.workers,
               fairseq_preprocess=args.fairseq_preprocess)
