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

import dataclasses
import logging
import os
import shlex
import shutil
import subprocess
import time

from data_prep.parallel_files import (DataPrepError, atomic_outputs, clean_pairs, encode_file, iter_lines,
                                      normalize, parse_direction, sentence_key,
                                      train_sentencepiece, write_fairseq_dict)
from data_prep.sampling import balanced_sample

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
    """The fairseq-preprocess to run: None = fairseq's Python API in this process (no ~5 s
    start-up per pair), else a command line (--fairseq-preprocess CMD)."""
    if override:
        return shlex.split(override)
    try:
        import fairseq_cli.preprocess  # noqa: F401
    except ImportError:
        raise DataPrepError("fairseq is not installed (fairseq-preprocess binarizes the data; "
                            "pip install fairseq, or pass --fairseq-preprocess CMD)") from None
    return None


def _preprocess_in_process(argv):
    """fairseq-preprocess's main on argv; returns (exit code, its log)."""
    from fairseq import options
    from fairseq_cli import preprocess

    args = options.get_preprocessing_parser().parse_args(argv)
    handlers_before, level = list(preprocess.logger.handlers), preprocess.logger.level
    preprocess.logger.setLevel(logging.WARNING)  # its INFO lines repeat what run() logs
    try:
        preprocess.main(args)
        return 0, ""
    except Exception as e:  # noqa: BLE001 -- reported in one line with its log
        return 1, f"{type(e).__name__}: {e}"
    finally:  # main adds a FileHandler on its module logger at every call
        for h in preprocess.logger.handlers:
            if h not in handlers_before:
                preprocess.logger.removeHandler(h)
                h.close()
        preprocess.logger.setLevel(level)


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
    argv = ["--source-lang", src, "--target-lang", tgt, "--destdir", stage,
            "--srcdict", dict_path, "--tgtdict", dict_path, "--workers", str(workers)]
    for split in splits:
        flag = {"train": "--trainpref", "valid": "--validpref", "test": "--testpref"}[split]
        argv += [flag, os.path.join(text_dir, f"{split}.{src}-{tgt}")]
    if cmd is None:
        returncode, output = _preprocess_in_process(argv)
        argv = ["fairseq-preprocess", *argv]
    else:
        argv = cmd + argv
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        returncode, output = proc.returncode, proc.stdout
    if returncode != 0:
        err_log = os.path.join(destdir, f"preprocess.{src}-{tgt}.error.log")
        with open(err_log, "w", encoding="utf-8") as f:
            f.write(" ".join(shlex.quote(a) for a in argv) + "\n" + output)
        shutil.rmtree(stage, ignore_errors=True)
        raise DataPrepError(f"fairseq-preprocess failed for {src}-{tgt} "
                            f"(exit {returncode}); output in {err_log}")
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
        fairseq_preprocess=None, seed=1, spm_model_type="unigram", remove_overlap=False,
        temperature=None, character_coverage=1.0, report=None, announce=True):
    """Prepares one multilingual data-bin directory.

    raw_pairs: {split: [Pair, ...]} for split in train/valid/test (train required); each Pair
    names the raw files of one language pair, in any format data_prep.readers reads; several
    Pairs of one direction are concatenated.
    remove_overlap: drop every train pair with a side that occurs in any valid or test set.
    temperature: train sentencepiece on a temperature-balanced sample of spm_input_sentence_size
    sentences (data_prep/sampling.py) instead of sentencepiece's uniform sample of one file per
    language. report: a dict, filled with the counts of each step and the sentencepiece settings.
    announce: end with the directory and the flags to train on it (a caller that moves the
    directory afterwards says that itself).
    """
    log = _Log(name)
    report = {} if report is None else report
    splits, pairs = _splits_and_pairs(name, raw_pairs)
    langs = sorted({lang for pair in pairs for lang in pair})
    cmd = preprocess_command(fairseq_preprocess)  # fail early, before hours of cleaning
    destdir = os.path.abspath(destdir)
    _check_no_foreign_pairs(destdir, pairs)
    work, raw_out = os.path.join(destdir, "work"), os.path.join(destdir, "raw")
    clean_dir, spm_dir = os.path.join(work, "clean"), os.path.join(work, "spm")
    log(f"pairs {', '.join(f'{s}-{t}' for s, t in pairs)}; languages {' '.join(langs)}; "
        f"output {destdir}")

    log("step 1/4: check and clean raw files")
    _clean_step(name, raw_pairs, splits, pairs, clean_dir, raw_out, report.setdefault("counts", {}), log,
                remove_overlap=remove_overlap, max_len=max_len, max_ratio=max_ratio, dedup=dedup,
                max_train_sentences=max_train_sentences)

    log(f"step 2/4: train joint sentencepiece (vocab {vocab_size}) and write dict.txt")
    spm_settings = {"vocab_size": vocab_size, "model_type": spm_model_type,
                    "character_coverage": character_coverage, "seed": seed}
    spm_model, dict_path = _sentencepiece_step(pairs, langs, clean_dir, work, destdir, spm_settings, report, log,
                                               spm_input_sentence_size=spm_input_sentence_size,
                                               temperature=temperature)

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
    with atomic_outputs([os.path.join(destdir, "langs.txt")]) as (f,):
        f.write("".join(lang + "\n" for lang in langs))
    both = [f"{a}-{b}" for s, t in pairs for a, b in ((s, t), (t, s))]
    if announce:
        log(f"done: {destdir}  (translation_multi_simple_epoch: --langs {','.join(langs)} "
            f"--lang-pairs {','.join(both)}); {work} can be deleted")
    return destdir


def _splits_and_pairs(name, raw_pairs):
    """The splits given (train first required) and the train directions, each split checked to
    hold every direction."""
    if "train" not in raw_pairs:
        raise DataPrepError(f"{name}: no train split given")
    splits = [s for s in SPLITS if s in raw_pairs]
    pairs = unique_pairs([(p.src, p.tgt) for p in raw_pairs["train"]])
    for split in splits:
        have = {(p.src, p.tgt) for p in raw_pairs[split]}
        missing = [f"{s}-{t}" for s, t in pairs if (s, t) not in have]
        if missing:
            raise DataPrepError(f"{name}: split {split} has no files for {', '.join(missing)}")
    return splits, pairs


def _clean_step(name, raw_pairs, splits, pairs, clean_dir, raw_out, counts, log, *, remove_overlap, max_len,
                max_ratio, dedup, max_train_sentences):
    """Step 1: train cleaned into clean_dir, held-out sets copied unfiltered into raw_out; the
    counts of each (split, direction) into `counts`."""
    # held-out sets first: their sentences are what train must not contain
    for split in sorted(splits, key=lambda s: s == "train"):
        todo = [p for p in raw_pairs[split] if (p.src, p.tgt) in pairs]
        if split == "train":
            exclude = _held_out_keys(raw_out, splits, pairs) if remove_overlap else None
            stats = clean_pairs(todo, clean_dir, split, max_len=max_len, max_ratio=max_ratio,
                                dedup=dedup, max_sentences=max_train_sentences, exclude=exclude)
        else:  # never filter evaluation sets: scores must stay comparable with published ones
            stats = clean_pairs(todo, raw_out, split, filter=False)
        for (s, t), st in stats.items():
            log(f"  {split} {s}-{t}: {st.summary()}")
            counts.setdefault(f"{s}-{t}", {})[split] = dataclasses.asdict(st)
            if st.kept == 0:
                raise DataPrepError(f"{name}: {split} {s}-{t} is empty after cleaning")


def _sentencepiece_step(pairs, langs, clean_dir, work, destdir, spm_settings, report, log, *,
                        spm_input_sentence_size, temperature):
    """Step 2: the joint sentencepiece model and dict.txt in destdir -> (spm model, dict.txt path);
    what was sampled and how goes into spm_settings, report["sentencepiece"]."""
    vocab_size, seed = spm_settings["vocab_size"], spm_settings["seed"]
    if temperature is None:
        # One train file per language: with en-de, en-fr, en-cs the English side would otherwise
        # be sampled three times as often as any other language.
        spm_inputs = {}
        for s, t in pairs:
            for lang in (s, t):
                spm_inputs.setdefault(lang, os.path.join(clean_dir, f"train.{s}-{t}.{lang}"))
        spm_files, sample_size = [spm_inputs[lang] for lang in langs], spm_input_sentence_size
        spm_settings["input_sentence_size"] = spm_input_sentence_size
    else:
        by_lang = {lang: [os.path.join(clean_dir, f"train.{s}-{t}.{lang}")
                          for s, t in pairs if lang in (s, t)] for lang in langs}
        sample_paths = {lang: os.path.join(work, "spm_sample", f"{lang}.txt") for lang in langs}
        spm_settings["sample"] = balanced_sample(by_lang, sample_paths, spm_input_sentence_size,
                                                 temperature, seed=seed)
        spm_settings.update(temperature=temperature, sample_size=spm_input_sentence_size)
        for lang, rec in spm_settings["sample"].items():
            log(f"  sample {lang}: {rec['sampled']} of {rec['sentences']} sentences "
                f"(share {rec['share']:.3f}, T={temperature})")
        spm_files, sample_size = [sample_paths[lang] for lang in langs], 0  # 0: all of it
    report["sentencepiece"] = spm_settings
    spm_model = train_sentencepiece(spm_files, os.path.join(destdir, "spm"), vocab_size,
                                    input_sentence_size=sample_size, seed=seed,
                                    model_type=spm_settings["model_type"],
                                    character_coverage=spm_settings["character_coverage"])
    dict_path = os.path.join(destdir, "dict.txt")
    n_dict = write_fairseq_dict(os.path.join(destdir, "spm.vocab"), dict_path)
    spm_settings["dictionary_entries"] = n_dict
    log(f"  {spm_model}, {n_dict} dictionary entries")
    return spm_model, dict_path


def _held_out_keys(raw_out, splits, pairs):
    """sentence_key() of every sentence, either side, of every valid and test set."""
    keys = set()
    for split in splits:
        if split == "train":
            continue
        for s, t in pairs:
            for lang in (s, t):
                for line in iter_lines(os.path.join(raw_out, f"{split}.{s}-{t}.{lang}")):
                    keys.add(sentence_key(normalize(line)))
    return keys


def run_from_args(name, raw_pairs, args):
    """`run` with the flags of add_common_args (plus the recipe's --destdir)."""
    return run(name, raw_pairs, args.destdir, vocab_size=args.vocab_size,
               spm_input_sentence_size=args.spm_input_sentence_size,
               max_train_sentences=args.max_train_sentences, max_len=args.max_len,
               max_ratio=args.max_ratio, dedup=args.dedup, workers=args.workers,
               fairseq_preprocess=args.fairseq_preprocess)
