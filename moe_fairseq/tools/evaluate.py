"""Generate every direction with fairseq-generate and score it with sacrebleu, safely.

`fairseq-generate` can silently leave sentences out (seen here: 7 of 1,071 with
translation_multi_simple_epoch), and scoring the shorter list against the first N references
gives a meaningless number.  Hypotheses are therefore aligned to the raw references by
sentence id, and a count mismatch is refused (or, with --allow-missing, scored as empty
hypotheses and reported).

Usage:
  moe-evaluate DATA_BIN --path CKPT --lang-pairs en-de,en-fr --raw-dir RAW --split test \
      [--out results/] [--beam 5] [--moe-eval-top-k K] [-- extra fairseq-generate args]
  moe-evaluate DATA_BIN --path CKPT --lang-pairs en-de,de-en --layout flores FLORES_ROOT
  moe-evaluate DATA_BIN --path CKPT --lang-pairs de-en --pairs test:de-en:SRC.de.sgm,REF.en.sgm
RAW holds the untokenized references as {split}.{src}-{tgt}.{tgt} or {split}.{tgt}.  With
--layout flores (dev/devtest) or --pairs (any format moe-prepare reads: plain, gz, tsv, sgm,
tmx), the test set is read as moe-prepare reads it, encoded with DATA_BIN's spm.model and
binarized with its dictionary into a temporary directory, then generated and scored against
its references.  Scores: sacrebleu BLEU and chrF, each with its signature.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from ..checkpoint.saved_args import arg, as_list, read_saved_args
from ..moe.errors import MoEUsageError

USER_DIR = str(Path(__file__).resolve().parents[1])  # the package: fairseq's --user-dir


def parse_generate_output(text: str) -> Dict[int, str]:
    """{sentence id: detokenized hypothesis} from D- lines (H- lines if there are none)."""
    detok, hyp = {}, {}
    for line in text.splitlines():
        m = re.match(r"^([DH])-(\d+)\t[^\t]*\t?(.*)$", line)
        if m:
            (detok if m.group(1) == "D" else hyp)[int(m.group(2))] = m.group(3)
    return detok or hyp


def read_lines(path: Path) -> List[str]:
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def find_references(raw_dir: Path, split: str, src: str, tgt: str) -> Path:
    for name in (f"{split}.{src}-{tgt}.{tgt}", f"{split}.{tgt}-{src}.{tgt}", f"{split}.{tgt}", f"{split}.{tgt}.gz"):
        if (raw_dir / name).exists():
            return raw_dir / name
    raise MoEUsageError(f"no references for {src}-{tgt} in {raw_dir} (looked for {split}.{src}-{tgt}.{tgt}, "
                        f"{split}.{tgt}-{src}.{tgt}, {split}.{tgt}[.gz])")


def align(hyps: Dict[int, str], n_refs: int, allow_missing: bool, label: str) -> List[str]:
    missing = [i for i in range(n_refs) if i not in hyps]
    extra = [i for i in hyps if not 0 <= i < n_refs]
    if extra:
        raise MoEUsageError(f"{label}: {len(extra)} hypotheses have ids outside the {n_refs} references "
                            f"(e.g. {extra[:5]}): wrong reference file?")
    if missing and not allow_missing:
        raise MoEUsageError(f"{label}: fairseq-generate returned {len(hyps)} of {n_refs} sentences "
                            f"(missing ids {missing[:10]}{'...' if len(missing) > 10 else ''}); refusing to "
                            f"score a shorter list (use --allow-missing to score them as empty)")
    return [hyps.get(i, "") for i in range(n_refs)]


def score(hyps: List[str], refs: List[str]):
    """sacrebleu BLEU (default settings, 13a) and its signature."""
    import sacrebleu

    metric = sacrebleu.metrics.BLEU()
    result = metric.corpus_score(hyps, [refs])
    return result.score, str(metric.get_signature())


def score_chrf(hyps: List[str], refs: List[str]):
    """sacrebleu chrF (default settings: character 6-grams, beta 2) and its signature."""
    import sacrebleu

    metric = sacrebleu.metrics.CHRF()
    return metric.corpus_score(hyps, [refs]).score, str(metric.get_signature())


# fairseq's --post-process symbols (fairseq.data.data_utils.post_process)
POST_PROCESS = ("sentencepiece", "subword_nmt", "none", "wordpiece", "letter", "silence", "_EOW",
                "@@ ", "@@")


def training_task_args(task_args) -> List[str]:
    """The fairseq-generate flags that must repeat the training task's: the task itself (a plain
    fairseq checkpoint keeps fairseq's translation_multi_simple_epoch), where the language tokens
    go (--encoder-langtok src|tgt, --decoder-langtok) and --langs / --lang-dict, so the dictionary's
    language tokens are where training put them even when a subset of directions is evaluated."""
    task = arg(task_args, "task") or arg(task_args, "_name") or "translation_multi_moe"
    flags = ["--task", task]
    if arg(task_args, "encoder_langtok"):
        flags += ["--encoder-langtok", arg(task_args, "encoder_langtok")]
    if arg(task_args, "decoder_langtok"):
        flags.append("--decoder-langtok")
    if arg(task_args, "lang_dict"):
        flags += ["--lang-dict", arg(task_args, "lang_dict")]
    else:
        langs = as_list(arg(task_args, "langs"))
        if not langs:
            langs = sorted({lang for pair in as_list(arg(task_args, "lang_pairs")) for lang in pair.split("-")})
        if langs:
            flags += ["--langs", ",".join(langs)]
    return flags


def run_generate(data: str, path: str, src: str, tgt: str, lang_pairs: str, split: str, beam: int,
                 batch_size: int, cpu: bool, extra: List[str], task_flags: List[str],
                 post_process: str = "sentencepiece") -> str:
    # This process installs no fairseq patch; fairseq-generate loads the plugin with --user-dir,
    # for what generation needs of it: the model and task, the checkpoint allowlist (patch 1),
    # the experts of a sharded checkpoint (6) and one-line errors (8); the rest act in training only.
    exe = Path(sys.executable).parent / "fairseq-generate"
    cmd = [str(exe) if exe.exists() else "fairseq-generate", data, "--user-dir", USER_DIR, *task_flags,
           "--lang-pairs", lang_pairs, "--source-lang", src, "--target-lang", tgt, "--path", path,
           "--gen-subset", split, "--beam", str(beam), "--batch-size", str(batch_size),
           "--post-process", post_process,
           # fairseq 0.12's batch_by_size drops a last batch smaller than the batch-size multiple
           # (default 8): 20 test sentences came back as 16.  Any batch size is fine to decode.
           "--required-batch-size-multiple", "1", *(["--cpu"] if cpu else []), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fairseq-generate failed for {src}-{tgt}:\n{proc.stderr[-3000:]}")
    return proc.stdout


def read_test_sets(args, directions) -> Dict[str, tuple]:
    """{direction: (sources, references)} from --layout flores ROOT or --pairs, read by
    moe-prepare's readers (data_prep); the sentences are whitespace-normalized as moe-prepare's."""
    from data_prep import layouts
    from data_prep.parallel_files import DataPrepError, normalize
    from data_prep.readers import read_pair

    split = {"test": "test", "devtest": "test", "valid": "valid", "dev": "valid"}.get(args.split)
    try:
        if split is None:
            raise DataPrepError(f"--split: '{args.split}' is not test (devtest) or valid (dev)")
        if args.layout:
            name, root = args.layout
            if name != "flores":
                raise DataPrepError(f"--layout: '{name}' is not flores (give WMT or other test sets "
                                    "with --pairs test:SRC-TGT:SRC_FILE,REF_FILE)")
            langs = {lang for d in directions for lang in d if lang != "en"}
            found = layouts.flores(root, langs, layouts.parse_lang_map(args.lang_map))
        else:
            found = layouts.parse_pairs(args.pairs)
        sets = {}
        for src, tgt in directions:
            pair = next((p for p in found.get(split, []) if {p.src, p.tgt} == {src, tgt}), None)
            if pair is None:
                raise DataPrepError(f"no {split} set for {src}-{tgt} in "
                                    f"{'--layout ' + ' '.join(args.layout) if args.layout else '--pairs'}")
            if pair.src != src:
                pair = pair.reversed()
            rows = [(normalize(s), normalize(t)) for s, t in read_pair(pair)]
            sets[f"{src}-{tgt}"] = ([s for s, _ in rows], [t for _, t in rows])
        return sets
    except DataPrepError as e:
        raise MoEUsageError(str(e)) from None


def binarize_test_sets(data: str, sets: Dict[str, tuple], work: Path) -> str:
    """Encodes each (sources, references) with DATA_BIN's spm.model and binarizes it with its
    dictionary as split `test` of a data directory in `work`; returns that directory."""
    from data_prep import pipeline
    from data_prep.parallel_files import DataPrepError, encode_file

    spm_model, dict_path = Path(data, "spm.model"), Path(data, "dict.txt")
    for need in (spm_model, dict_path):
        if not need.is_file():
            raise MoEUsageError(f"{data} has no {need.name}: reading a test set with --layout/--pairs "
                                "needs the data-bin moe-prepare writes")
    text, out = work / "text", work / "bin"
    out.mkdir(parents=True)
    for name in os.listdir(data):  # fairseq's multilingual task loads dict.{lang}.txt of every language
        if re.fullmatch(r"dict\.[^.]+\.txt", name):
            shutil.copy(Path(data, name), out / name)
    try:
        for direction, (sources, refs) in sets.items():
            src, tgt = direction.split("-")
            for lang, lines in ((src, sources), (tgt, refs)):
                raw = work / "raw" / f"test.{direction}.{lang}"
                raw.parent.mkdir(exist_ok=True)
                raw.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
                encode_file(str(spm_model), str(raw), str(text / f"test.{direction}.{lang}"))
            pipeline.binarize_pair(pipeline.preprocess_command(), src, tgt, str(text), str(out),
                                   str(dict_path), ["test"], 1)
    except DataPrepError as e:
        raise MoEUsageError(str(e)) from None
    return str(out)


def evaluate(args) -> List[dict]:
    rows = []
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    # the checkpoint's own task flags; an explicit --langs and the arguments after '--' come later
    # on the command line, so they win (argparse keeps the last value)
    task_flags = training_task_args(read_saved_args(args.path, "--path").task)
    if args.langs:
        task_flags += ["--langs", args.langs]
    directions = [tuple(pair.split("-")) for pair in args.lang_pairs.split(",")]
    data, split, work, test_sets = args.data, args.split, None, None
    if args.layout or args.pairs:
        test_sets = read_test_sets(args, directions)
        work = Path(tempfile.mkdtemp(prefix="moe-evaluate-"))
        data, split = binarize_test_sets(args.data, test_sets, work), "test"
    try:
        for src, tgt in directions:
            pair = f"{src}-{tgt}"
            if test_sets:
                sources, refs = test_sets[pair]
            else:
                refs = read_lines(find_references(Path(args.raw_dir), args.split, src, tgt))
            start = time.time()
            text = run_generate(data, args.path, src, tgt, args.lang_pairs, split, args.beam,
                                args.batch_size, args.cpu, args.generate_args, task_flags,
                                args.post_process)
            if out:
                (out / f"generate.{args.split}.{pair}.txt").write_text(text, encoding="utf-8")
            hyps = align(parse_generate_output(text), len(refs), args.allow_missing, pair)
            bleu, signature = score(hyps, refs)
            chrf, chrf_signature = score_chrf(hyps, refs)
            row = {"direction": pair, "bleu": round(bleu, 2), "chrf": round(chrf, 2),
                   "sentences": len(refs), "missing": sum(1 for h in hyps if not h),
                   "seconds": round(time.time() - start, 1), "signature": signature,
                   "chrf_signature": chrf_signature}
            if args.copy_baseline:
                if not test_sets:
                    sources = read_lines(find_references(Path(args.raw_dir), args.split, tgt, src))
                row["bleu_copy_source"] = round(score(sources, refs)[0], 2)
            rows.append(row)
            print(f"{pair}: BLEU {row['bleu']:.2f} chrF {row['chrf']:.2f}", flush=True)
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def markdown_table(rows: List[dict]) -> str:
    copy = any("bleu_copy_source" in r for r in rows)
    chrf = any("chrf" in r for r in rows)
    head = "| direction | BLEU |" + (" chrF |" if chrf else "") + (" copy-source BLEU |" if copy else "") \
        + " sentences |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['direction']} | {r['bleu']:.2f} |" + (f" {r['chrf']:.2f} |" if chrf else "")
                     + (f" {r['bleu_copy_source']:.2f} |" if copy else "") + f" {r['sentences']} |")
    if rows:
        lines.append("")
        lines.append(f"sacrebleu signature: `{rows[0]['signature']}`")
        if chrf:
            lines.append(f"chrF signature: `{rows[0]['chrf_signature']}`")
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="fairseq data-bin directory")
    p.add_argument("--path", required=True, help="checkpoint to evaluate")
    p.add_argument("--lang-pairs", required=True, help="directions to evaluate, e.g. en-de,en-fr")
    p.add_argument("--langs", help="language list for the dictionary's language tokens (default: the checkpoint's)")
    p.add_argument("--raw-dir", help="directory with the raw (untokenized) references of DATA_BIN's split")
    p.add_argument("--layout", nargs=2, metavar=("flores", "ROOT"),
                   help="read the test set from a FLORES tree (flores200_dataset/{dev,devtest}/CODE.SPLIT) "
                        "instead of DATA_BIN; --split test = devtest, valid = dev")
    p.add_argument("--pairs", nargs="+", metavar="SPLIT:SRC-TGT:FILES",
                   help="read the test set from files, as moe-prepare --pairs: e.g. "
                        "test:de-en:newstest2018-deen-src.de.sgm,newstest2018-deen-ref.en.sgm")
    p.add_argument("--lang-map", help="with --layout flores: FLORES codes to yours, e.g. deu_Latn=de")
    p.add_argument("--split", default="test", help="fairseq subset name (default: test)")
    p.add_argument("--post-process", default="sentencepiece",
                   help="how fairseq-generate turns subwords into text, fairseq's --post-process: "
                        "sentencepiece (default), subword_nmt, none, ...")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--allow-missing", action="store_true",
                   help="score sentences fairseq-generate left out as empty hypotheses instead of failing")
    p.add_argument("--copy-baseline", action="store_true", help="also score a copy of the source")
    p.add_argument("--out", help="write generate output, results.md and results.json here")
    p.epilog = "Arguments after '--' go to fairseq-generate (e.g. -- --moe-eval-top-k 2)."
    return p


def main(argv: Optional[List[str]] = None) -> List[dict]:
    """Run the evaluation; returns one record per direction."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:  # split by hand: argparse.REMAINDER would swallow our own options too
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.generate_args = extra
    if not os.path.exists(args.path):
        sys.exit(f"moe-evaluate: error: --path {args.path} does not exist")
    if sum(map(bool, (args.raw_dir, args.layout, args.pairs))) != 1:
        sys.exit("moe-evaluate: error: give the references with one of --raw-dir, --layout flores ROOT, --pairs")
    if args.post_process not in POST_PROCESS:
        sys.exit(f"moe-evaluate: error: --post-process: '{args.post_process}' is not one of "
                 f"{', '.join(POST_PROCESS)}")
    try:
        rows = evaluate(args)
    except MoEUsageError as e:
        sys.exit(f"moe-evaluate: error: {e}")
    table = markdown_table(rows)
    print(table)
    if args.out:
        Path(args.out, "results.md").write_text(table + "\n", encoding="utf-8")
        Path(args.out, "results.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return rows


def cli_main(argv: Optional[List[str]] = None) -> None:
    from ..console import quiet_third_party_warnings

    quiet_third_party_warnings()
    main(argv)  # a console script's return value would become its exit status


if __name__ == "__main__":
    cli_main()
