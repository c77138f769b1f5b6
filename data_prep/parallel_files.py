"""Cleaning of raw parallel files (plain or .gz) and the sentencepiece / fairseq-dictionary helpers.

Outputs use fairseq's naming, ``{out}/{split}.{src}-{tgt}.{src}`` and ``.{tgt}``.
Every output is written with ``moe_fairseq.atomic_files.atomic_outputs`` (a hidden temp file in
the destination directory, moved into place with ``os.replace``), so a finished output is never
replaced by a half-written one and an interrupted run leaves the previous outputs untouched.

CLI examples::

    python -m data_prep.parallel_files --out clean --split train \\
        --pair en-de:raw/train.en.gz,raw/train.de.gz --pair en-fr:raw/train.en.gz,raw/train.fr.gz
    python -m data_prep.parallel_files --out clean --raw-dir raw --prefix train --directions en-de,en-fr --dedup
"""

import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import os
import sys
from functools import partial

from moe_fairseq.atomic_files import atomic_outputs as _atomic_outputs

# sentencepiece's control symbols; fairseq's Dictionary adds its own <s> <pad> </s> <unk>, so they
# must not appear a second time in dict.txt (fairseq would reject the duplicates).
SPM_SPECIAL_PIECES = ("<unk>", "<s>", "</s>", "<pad>")


class DataPrepError(Exception):
    """A user-facing error; its message is one line that names the offending file or flag."""


@dataclasses.dataclass(frozen=True)
class Pair:
    """One translation direction and its two line-aligned raw files (or one .tsv/.tmx file
    holding both sides: then tgt_path == src_path)."""

    src: str
    tgt: str
    src_path: str
    tgt_path: str
    swapped: bool = False  # a .tsv's columns are (tgt, src): the pair was reversed

    def reversed(self):
        return Pair(self.tgt, self.src, self.tgt_path, self.src_path, not self.swapped)


@dataclasses.dataclass
class CleanStats:
    read: int = 0
    kept: int = 0
    empty: int = 0
    too_long: int = 0
    ratio: int = 0
    duplicate: int = 0
    over_limit: int = 0  # beyond --max-sentences
    overlap: int = 0  # a side occurs in a valid or test set

    def summary(self):
        dropped = self.read - self.kept
        return (f"read {self.read}, kept {self.kept}, dropped {dropped} (empty {self.empty}, "
                f"too_long {self.too_long}, ratio {self.ratio}, duplicate {self.duplicate}, "
                f"over_limit {self.over_limit}, overlap {self.overlap})")


# --------------------------------------------------------------------------------------------- io

def open_text(path):
    """Opens plain or gzipped UTF-8 text for reading.

    newline="\\n": only "\\n" ends a line. Python's default universal-newline mode would also split
    on a stray "\\r", so line counts would differ from `wc -l` and from the other side of the pair.
    """
    if not os.path.isfile(path):
        raise DataPrepError(f"{path}: no such file")
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="\n")
    return open(path, "r", encoding="utf-8", newline="\n")


def iter_lines(path):
    """Yields the lines of `path` without their line ending; errors name the file and line."""
    lineno = 0
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                yield line.rstrip("\n")
    except UnicodeDecodeError:
        raise DataPrepError(f"{path}: not valid UTF-8 (after line {lineno})") from None
    except (OSError, EOFError) as e:  # e.g. a truncated .gz
        raise DataPrepError(f"{path}: cannot read ({e})") from None


def count_lines(path):
    return sum(1 for _ in iter_lines(path))


def normalize(line):
    """Strips and collapses every run of whitespace to one space.

    Besides tidying, this removes in-line characters such as "\\r", "\\x85" or "\\u2028" that other
    readers (fairseq-preprocess opens files in universal-newline mode) would treat as line breaks,
    which would silently misalign source and target.
    """
    return " ".join(line.split())


# Text outputs, atomic together; hidden temporaries, since readers of a data directory
# (layouts.py) skip dot files but would take a stale `train.en.tmp123` for a corpus file.
atomic_outputs = partial(_atomic_outputs, mode="w", hidden=True)


# --------------------------------------------------------------------------------------- cleaning

def output_paths(out_dir, split, src, tgt):
    """fairseq's naming: train.en-de.en / train.en-de.de."""
    prefix = os.path.join(out_dir, f"{split}.{src}-{tgt}")
    return f"{prefix}.{src}", f"{prefix}.{tgt}"


def aligned(src_it, tgt_it, src_path, tgt_path):
    """Yields (src, tgt) from two sentence iterators; raises a one-line error naming both files
    if their counts differ."""
    n = 0
    for s in src_it:
        t = next(tgt_it, None)
        if t is None:  # target ended first: count the rest of the source for the message
            n_src = n + 1 + sum(1 for _ in src_it)
            raise DataPrepError(f"line count mismatch: {src_path} has {n_src} lines but "
                                f"{tgt_path} has {n} lines")
        n += 1
        yield s, t
    rest = sum(1 for _ in tgt_it)
    if rest:
        raise DataPrepError(f"line count mismatch: {src_path} has {n} lines but "
                            f"{tgt_path} has {n + rest} lines")


def sentence_key(text):
    """A 16-byte digest of a sentence (or pair): bounded memory on WMT-sized corpora."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def clean_lines(pairs_of_lines, out_src, out_tgt, max_len=250, max_ratio=3.0, dedup=False,
                filter=True, max_sentences=None, exclude=None, stats=None, seen=None):
    """Writes the kept (src, tgt) lines to the open files out_src/out_tgt; returns CleanStats.

    filter=False only normalizes whitespace and keeps every line (for valid/test sets, whose
    references must not be filtered, or scores would not be comparable with published ones).
    exclude: sentence_key()s of held-out sentences; a pair either of whose sides is one of them
    is dropped (counted as `overlap`, after the duplicate check). stats/seen carry the counts
    and the dedup set over several inputs of one direction.
    """
    stats = CleanStats() if stats is None else stats
    seen = set() if seen is None else seen
    for s, t in pairs_of_lines:
        stats.read += 1
        s, t = normalize(s), normalize(t)
        if max_sentences is not None and stats.kept >= max_sentences:
            stats.over_limit += 1  # keep reading: the line-count check must still see every line
            continue
        if filter:
            ns, nt = len(s.split()), len(t.split())
            if ns == 0 or nt == 0:
                stats.empty += 1
                continue
            if ns > max_len or nt > max_len:
                stats.too_long += 1
                continue
            if max(ns, nt) > max_ratio * min(ns, nt):
                stats.ratio += 1
                continue
            if dedup:
                # a 16-byte digest instead of the text keeps memory bounded on WMT-sized corpora
                key = sentence_key(f"{s}\n{t}")
                if key in seen:
                    stats.duplicate += 1
                    continue
                seen.add(key)
            if exclude and (sentence_key(s) in exclude or sentence_key(t) in exclude):
                stats.overlap += 1
                continue
        out_src.write(s + "\n")
        out_tgt.write(t + "\n")
        stats.kept += 1
    return stats


def clean_pairs(pairs, out_dir, split, **clean_kwargs):
    """Cleans several pairs as one transaction: all outputs appear, or none changes.

    Pairs of the same direction (several corpora, e.g. Europarl and News Commentary) are
    concatenated, in the order given, into one output, and deduplicated across each other.
    Any format data_prep.readers reads is accepted. Returns {(src, tgt): CleanStats}. Raises
    DataPrepError (no output written) on a line-count mismatch or unreadable input.
    """
    from data_prep.readers import read_pair  # readers builds on this module

    groups = {}
    for p in pairs:
        groups.setdefault((p.src, p.tgt), []).append(p)
    langs_seen = {}
    for s, t in groups:
        if frozenset((s, t)) in langs_seen:
            raise DataPrepError(f"--pair: {s}-{t} and {langs_seen[frozenset((s, t))]} are both "
                                f"given for split {split}: give one direction of a language pair")
        langs_seen[frozenset((s, t))] = f"{s}-{t}"
    outputs = [output_paths(out_dir, split, s, t) for s, t in groups]
    stats = {}
    with atomic_outputs([path for o in outputs for path in o]) as handles:
        for i, (direction, group) in enumerate(groups.items()):
            st, seen = CleanStats(), set()
            for p in group:
                clean_lines(read_pair(p), handles[2 * i], handles[2 * i + 1], stats=st, seen=seen,
                            **clean_kwargs)
            stats[direction] = st
    return stats


# ------------------------------------------------------------------------- sentencepiece / fairseq

def _import_spm():
    try:
        import sentencepiece
    except ImportError:
        raise DataPrepError("sentencepiece is not installed (pip install sentencepiece)") from None
    return sentencepiece


def train_sentencepiece(inputs, model_prefix, vocab_size, input_sentence_size=1_000_000,
                        model_type="unigram", character_coverage=1.0, seed=1, num_threads=2,
                        **extra):
    """Trains one sentencepiece model on plain-text `inputs`; writes {model_prefix}.model/.vocab.

    hard_vocab_limit=False makes vocab_size an upper bound, so tiny corpora (tests, quick runs)
    do not fail with "vocabulary size too high". input_sentence_size + shuffle caps memory on big
    corpora with a uniform sample. Both files are trained under a temp prefix and then moved.
    """
    spm = _import_spm()
    for path in inputs:
        if not os.path.isfile(path):
            raise DataPrepError(f"{path}: sentencepiece input does not exist")
        if "," in path:  # sentencepiece splits its input list on commas
            raise DataPrepError(f"{path}: sentencepiece cannot read paths containing ','")
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_prefix = os.path.join(out_dir, f".{os.path.basename(model_prefix)}.tmp{os.getpid()}")
    spm.set_random_generator_seed(seed)  # the shuffled sample, hence the model, is reproducible
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(inputs), model_prefix=tmp_prefix, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            hard_vocab_limit=False, num_threads=num_threads, minloglevel=1, **extra)
        os.replace(tmp_prefix + ".vocab", model_prefix + ".vocab")
        os.replace(tmp_prefix + ".model", model_prefix + ".model")  # .model last: marks "done"
    finally:
        for ext in (".model", ".vocab"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_prefix + ext)
    return model_prefix + ".model"


def encode_file(spm_model, in_path, out_path, batch_size=10_000):
    """Writes `in_path` (plain or .gz) as space-separated sentencepiece pieces, line for line."""
    spm = _import_spm()
    if not os.path.isfile(spm_model):
        raise DataPrepError(f"{spm_model}: sentencepiece model does not exist")
    sp = spm.SentencePieceProcessor(model_file=spm_model)
    n = 0
    with atomic_outputs([out_path]) as (out,):
        batch = []
        for line in iter_lines(in_path):
            batch.append(normalize(line))
            if len(batch) == batch_size:
                n += _encode_batch(sp, batch, out)
                batch = []
        n += _encode_batch(sp, batch, out)
    return n


def _encode_batch(sp, batch, out):
    for pieces in sp.encode(batch, out_type=str):
        out.write(" ".join(pieces) + "\n")
    return len(batch)


def write_fairseq_dict(spm_vocab, out_dict):
    """Converts a sentencepiece .vocab ("piece<TAB>score") into a fairseq dict.txt ("piece 1").

    All directions then share this one dictionary (passed as both --srcdict and --tgtdict).
    Returns the number of entries written.
    """
    n = 0
    with atomic_outputs([out_dict]) as (out,):
        for lineno, line in enumerate(iter_lines(spm_vocab), 1):
            piece = line.split("\t", 1)[0]
            if not piece or any(c.isspace() for c in piece):
                raise DataPrepError(f"{spm_vocab}: line {lineno} is not a sentencepiece vocab entry")
            if piece in SPM_SPECIAL_PIECES:
                continue
            out.write(f"{piece} 1\n")
            n += 1
    return n


# -------------------------------------------------------------------------------------------- cli

def find_raw_file(raw_dir, prefix, src, tgt, lang):
    """Finds a raw file in either naming scheme, plain or gzipped.

    Multi-way aligned corpora (Multi30k): {prefix}.{lang}; per-pair corpora (WMT):
    {prefix}.{src}-{tgt}.{lang} or {prefix}.{tgt}-{src}.{lang}.
    """
    names = [f"{prefix}.{src}-{tgt}.{lang}", f"{prefix}.{tgt}-{src}.{lang}", f"{prefix}.{lang}"]
    for name in names:
        for cand in (name, name + ".gz"):
            path = os.path.join(raw_dir, cand)
            if os.path.isfile(path):
                return path
    raise DataPrepError(f"{raw_dir}: no raw file for {lang} of {src}-{tgt} "
                        f"(looked for {', '.join(names)}, optionally .gz)")


def parse_direction(text, flag="--directions"):
    parts = text.split("-")
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise DataPrepError(f"{flag}: '{text}' is not a direction like en-de")
    return parts[0], parts[1]


def parse_pair_arg(text):
    """'en-de:train.en.gz,train.de.gz' -> Pair."""
    direction, sep, files = text.partition(":")
    paths = files.split(",")
    if not sep or len(paths) != 2 or not all(paths):
        raise DataPrepError(f"--pair: '{text}' is not like en-de:SRC_FILE,TGT_FILE")
    src, tgt = parse_direction(direction, "--pair")
    return Pair(src, tgt, paths[0], paths[1])


def build_arg_parser():
    p = argparse.ArgumentParser(
        prog="python -m data_prep.parallel_files",
        description="Check and clean raw parallel files into fairseq-named plain text "
                    "({out}/{split}.{src}-{tgt}.{lang}). Writes are atomic; reruns are safe.")
    p.add_argument("--pair", action="append", default=[], metavar="SRC-TGT:SRCFILE,TGTFILE",
                   help="a direction and its two line-aligned files (plain or .gz); repeatable")
    p.add_argument("--raw-dir", help="alternative to --pair: directory of raw files named "
                   "{prefix}.{lang}[.gz] or {prefix}.{src}-{tgt}.{lang}[.gz]")
    p.add_argument("--prefix", default="train", help="file prefix in --raw-dir (default: train)")
    p.add_argument("--directions", help="with --raw-dir: comma-separated, e.g. en-de,en-fr")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--split", help="split name used in output names (default: --prefix)")
    p.add_argument("--max-len", type=int, default=250,
                   help="drop pairs with a side longer than this many whitespace tokens (250)")
    p.add_argument("--max-ratio", type=float, default=3.0,
                   help="drop pairs whose token-length ratio (longer/shorter) exceeds this (3.0)")
    p.add_argument("--dedup", action="store_true", help="drop repeated (src, tgt) pairs")
    p.add_argument("--no-filter", action="store_true",
                   help="only normalize whitespace, keep every line (for valid/test sets)")
    p.add_argument("--max-sentences", type=int, help="keep at most this many pairs per direction")
    return p


def pairs_from_args(args):
    pairs = [parse_pair_arg(t) for t in args.pair]
    if args.raw_dir:
        if not args.directions:
            raise DataPrepError("--raw-dir needs --directions (e.g. en-de,en-fr)")
        for d in args.directions.split(","):
            src, tgt = parse_direction(d)
            pairs.append(Pair(src, tgt, find_raw_file(args.raw_dir, args.prefix, src, tgt, src),
                              find_raw_file(args.raw_dir, args.prefix, src, tgt, tgt)))
    if not pairs:
        raise DataPrepError("give at least one --pair, or --raw-dir with --directions")
    return pairs


def main(argv=None):
    args = build_arg_parser().parse_args(argv)
    try:
        if args.max_len < 1 or args.max_ratio < 1:
            raise DataPrepError("--max-len must be >= 1 and --max-ratio >= 1")
        split = args.split or args.prefix
        stats = clean_pairs(pairs_from_args(args), args.out, split, max_len=args.max_len,
                            max_ratio=args.max_ratio, dedup=args.dedup,
                            filter=not args.no_filter, max_sentences=args.max_sentences)
    except DataPrepError as e:
        sys.exit(f"parallel_files: error: {e}")
    for (src, tgt), s in stats.items():
        print(f"{split} {src}-{tgt}: {s.summary()}")


if __name__ == "__main__":
    main()
