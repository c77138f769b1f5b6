"""Generate every direction with fairseq-generate and score it with sacrebleu, safely.

`fairseq-generate` can silently leave sentences out (seen here: 7 of 1,071 with
translation_multi_simple_epoch), and scoring the shorter list against the first N references
gives a meaningless number.  Hypotheses are therefore aligned to the raw references by
sentence id, and a count mismatch is refused (or, with --allow-missing, scored as empty
hypotheses and reported).

Usage:
  moe-evaluate DATA_BIN --path CKPT --lang-pairs en-de,en-fr --raw-dir RAW --split test \
      [--out results/] [--beam 5] [--moe-eval-top-k K] [-- extra fairseq-generate args]
RAW holds the untokenized references as {split}.{src}-{tgt}.{tgt} or {split}.{tgt}.
"""
import argparse
import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .moe.errors import MoEUsageError

USER_DIR = str(Path(__file__).resolve().parent)


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
    import sacrebleu

    metric = sacrebleu.metrics.BLEU()
    result = metric.corpus_score(hyps, [refs])
    return result.score, str(metric.get_signature())


def _get(ns, key, default=None):
    return ns.get(key, default) if isinstance(ns, dict) else getattr(ns, key, default)


def _as_list(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]


def read_checkpoint_args(path):
    """(model args, task args) saved in a fairseq checkpoint, loaded with torch.load's default
    weights_only check (fairseq_patches allowlists what fairseq checkpoints hold)."""
    import torch

    from . import fairseq_patches

    fairseq_patches.install()

    try:
        state = torch.load(path, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        # torch's message runs to a dozen lines; its first says what failed
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MoEUsageError(f"{path} is not a readable torch checkpoint: {first}") from e
    if not isinstance(state, dict):
        raise MoEUsageError(f"{path} holds a {type(state).__name__}, not a fairseq checkpoint")
    cfg = state.get("cfg")
    if cfg is not None and _get(cfg, "model") is not None:
        return _get(cfg, "model"), _get(cfg, "task")
    if state.get("args") is not None:
        return state["args"], state["args"]
    raise MoEUsageError(f"{path} holds neither cfg nor args: not a fairseq checkpoint")


def training_task_args(task_args) -> List[str]:
    """The fairseq-generate flags that must repeat the training task's: the task itself (a plain
    fairseq checkpoint keeps fairseq's translation_multi_simple_epoch), where the language tokens
    go (--encoder-langtok src|tgt, --decoder-langtok) and --langs / --lang-dict, so the dictionary's
    language tokens are where training put them even when a subset of directions is evaluated."""
    task = _get(task_args, "task") or _get(task_args, "_name") or "translation_multi_moe"
    flags = ["--task", task]
    if _get(task_args, "encoder_langtok"):
        flags += ["--encoder-langtok", _get(task_args, "encoder_langtok")]
    if _get(task_args, "decoder_langtok"):
        flags.append("--decoder-langtok")
    if _get(task_args, "lang_dict"):
        flags += ["--lang-dict", _get(task_args, "lang_dict")]
    else:
        langs = _as_list(_get(task_args, "langs"))
        if not langs:
            langs = sorted({lang for pair in _as_list(_get(task_args, "lang_pairs")) for lang in pair.split("-")})
        if langs:
            flags += ["--langs", ",".join(langs)]
    return flags


def run_generate(data: str, path: str, src: str, tgt: str, lang_pairs: str, split: str, beam: int,
                 batch_size: int, cpu: bool, extra: List[str], task_flags: List[str]) -> str:
    exe = Path(sys.executable).parent / "fairseq-generate"
    cmd = [str(exe) if exe.exists() else "fairseq-generate", data, "--user-dir", USER_DIR, *task_flags,
           "--lang-pairs", lang_pairs, "--source-lang", src, "--target-lang", tgt, "--path", path,
           "--gen-subset", split, "--beam", str(beam), "--batch-size", str(batch_size),
           "--post-process", "sentencepiece",
           # fairseq 0.12's batch_by_size drops a last batch smaller than the batch-size multiple
           # (default 8): 20 test sentences came back as 16.  Any batch size is fine to decode.
           "--required-batch-size-multiple", "1", *(["--cpu"] if cpu else []), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fairseq-generate failed for {src}-{tgt}:\n{proc.stderr[-3000:]}")
    return proc.stdout


def evaluate(args) -> List[dict]:
    raw_dir = Path(args.raw_dir)
    rows = []
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    # the checkpoint's own task flags; an explicit --langs and the arguments after '--' come later
    # on the command line, so they win (argparse keeps the last value)
    task_flags = training_task_args(read_checkpoint_args(args.path)[1])
    if args.langs:
        task_flags += ["--langs", args.langs]
    for pair in args.lang_pairs.split(","):
        src, tgt = pair.split("-")
        refs = read_lines(find_references(raw_dir, args.split, src, tgt))
        start = time.time()
        text = run_generate(args.data, args.path, src, tgt, args.lang_pairs, args.split, args.beam,
                            args.batch_size, args.cpu, args.generate_args, task_flags)
        if out:
            (out / f"generate.{args.split}.{pair}.txt").write_text(text, encoding="utf-8")
        hyps = align(parse_generate_output(text), len(refs), args.allow_missing, pair)
        bleu, signature = score(hyps, refs)
        row = {"direction": pair, "bleu": round(bleu, 2), "sentences": len(refs),
               "missing": sum(1 for h in hyps if not h), "seconds": round(time.time() - start, 1),
               "signature": signature}
        if args.copy_baseline:
            sources = read_lines(find_references(raw_dir, args.split, tgt, src))
            row["bleu_copy_source"] = round(score(sources, refs)[0], 2)
        rows.append(row)
        print(f"{pair}: BLEU {row['bleu']:.2f}", flush=True)
    return rows


def markdown_table(rows: List[dict]) -> str:
    copy = any("bleu_copy_source" in r for r in rows)
    head = "| direction | BLEU |" + (" copy-source BLEU |" if copy else "") + " sentences |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['direction']} | {r['bleu']:.2f} |" + (f" {r['bleu_copy_source']:.2f} |" if copy else "")
                     + f" {r['sentences']} |")
    if rows:
        lines.append("")
        lines.append(f"sacrebleu signature: `{rows[0]['signature']}`")
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="fairseq data-bin directory")
    p.add_argument("--path", required=True, help="checkpoint to evaluate")
    p.add_argument("--lang-pairs", required=True, help="directions to evaluate, e.g. en-de,en-fr")
    p.add_argument("--langs", help="language list for the dictionary's language tokens (default: the checkpoint's)")
    p.add_argument("--raw-dir", required=True, help="directory with the raw (untokenized) references")
    p.add_argument("--split", default="test", help="fairseq subset name (default: test)")
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
    main(argv)  # a console script's return value would become its exit status


if __name__ == "__main__":
    cli_main()
