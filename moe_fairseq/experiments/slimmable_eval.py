"""Self-slimmable inference of a SMoE-Dropout model: BLEU per direction as a function of k.

  python scripts/slimmable_eval.py checkpoints/m30k_smoe/checkpoint_best.pt --data data-bin/multi30k \
      --raw-dir data-bin/multi30k/raw --out results/m30k_smoe_slimmable [--lang-pairs en-de,en-fr] \
      [--split test] [--beam 4] [--ks 1,2,4,8] [--cpu] [-- extra fairseq-generate args]

E (experts per MoE layer) comes from the checkpoint's saved args (cfg['model'].moe_expert_count);
k runs over 1, 2, 4, ..., E (and E itself).  For each k, `moe-evaluate` (moe_fairseq.tools.evaluate)
generates every direction with fairseq-generate `--moe-eval-top-k K` and scores it with
sacrebleu against the raw references.  Works for the routers whose k can change at inference:
random (SMoE-Dropout) and noisy_topk.

Writes to --out: k{K}/ (moe-evaluate's generate output, results.md/json for that k),
slimmable.json, slimmable.md (table: k x direction, with the mean) and slimmable_bleu.png.

moe-evaluate repeats the checkpoint's task flags (task, language tokens, --langs), so evaluating a
subset of the directions keeps the dictionary's language tokens where training put them.  It finds
references named {split}.{src}-{tgt}.{tgt}, {split}.{tgt}-{src}.{tgt} (the wmt10 recipe's layout)
or {split}.{tgt}.
"""
import argparse
import sys
import time
from pathlib import Path

from ..atomic_files import atomic_write_json, atomic_write_text
from ..checkpoint.saved_args import arg, as_list, read_saved_args
from ..moe.errors import MoEUsageError

SLIMMABLE_ROUTERS = ("random", "noisy_topk")


def default_ks(num_experts):
    ks, k = [], 1
    while k <= num_experts:
        ks.append(k)
        k *= 2
    if ks[-1] != num_experts:
        ks.append(num_experts)
    return ks


def markdown(ks, pairs, table, signature):
    cols = ["k", *pairs] + (["mean"] if len(pairs) > 1 else [])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for k in ks:
        row = [table[k][p] for p in pairs]
        cells = [str(k)] + [f"{b:.2f}" for b in row] + ([f"{sum(row) / len(row):.2f}"] if len(pairs) > 1 else [])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"sacrebleu signature: `{signature}`"]
    return "\n".join(lines) + "\n"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("checkpoint", help="SMoE-Dropout (random router) or noisy_topk checkpoint")
    p.add_argument("--data", required=True, help="fairseq data-bin directory")
    p.add_argument("--raw-dir", required=True, help="raw references ({split}.{src}-{tgt}.{tgt} or {split}.{tgt})")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--lang-pairs", help="directions to score (default: the checkpoint's --lang-pairs)")
    p.add_argument("--ks", help="comma-separated k values (default 1,2,4,...,E)")
    p.add_argument("--split", default="test")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--allow-missing", action="store_true", help="passed to moe-evaluate")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = build_parser()
    args = p.parse_args(argv)

    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        p.error(f"no such checkpoint: {ckpt}")
    try:
        saved = read_saved_args(str(ckpt))
    except MoEUsageError as e:
        raise SystemExit(f"slimmable_eval: error: {e}")
    num_experts, router = saved.num_experts, saved.router
    if num_experts < 1:
        raise SystemExit(f"slimmable_eval: {ckpt} is a dense model (moe_expert_count={num_experts})")
    if router not in SLIMMABLE_ROUTERS:
        raise SystemExit(f"slimmable_eval: the {router} router has a fixed k; --moe-eval-top-k needs "
                         f"one of {', '.join(SLIMMABLE_ROUTERS)}")
    ks = [int(k) for k in args.ks.split(",")] if args.ks else default_ks(num_experts)
    bad = [k for k in ks if not 1 <= k <= num_experts]
    if bad:
        p.error(f"--ks {bad} outside 1..E={num_experts}")
    pairs = args.lang_pairs.split(",") if args.lang_pairs else as_list(arg(saved.task, "lang_pairs"))
    if not pairs:
        p.error("--lang-pairs is required (the checkpoint does not name its directions)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = Path(args.raw_dir)
    print(f"{ckpt}: {router} router, E={num_experts}; k in {ks}; directions {', '.join(pairs)}", flush=True)

    from ..tools.evaluate import main as moe_evaluate

    table, rows_all, signature = {}, [], ""
    start = time.time()
    for i, k in enumerate(ks, 1):
        print(f"== [{i}/{len(ks)}] k={k}: moe-evaluate, {len(pairs)} direction(s) "
              f"({time.time() - start:.0f}s elapsed)", flush=True)
        # Options first, then DATA, then '--' and the fairseq-generate arguments: moe-evaluate's
        # parser ends with an argparse.REMAINDER positional, which (Python 3.11) swallows every
        # option that follows DATA, so "DATA --path ..." does not parse.
        eval_argv = ["--path", str(ckpt), "--lang-pairs", ",".join(pairs), "--raw-dir", str(raw),
                     "--split", args.split, "--beam", str(args.beam), "--batch-size", str(args.batch_size),
                     "--out", str(out / f"k{k}"), *(["--cpu"] if args.cpu else []),
                     *(["--allow-missing"] if args.allow_missing else []),
                     args.data, "--", "--moe-eval-top-k", str(k), *extra]
        t = time.time()
        rows = moe_evaluate(eval_argv)
        table[k] = {r["direction"]: r["bleu"] for r in rows}
        signature = rows[0]["signature"] if rows else signature
        for r in rows:
            rows_all.append({"k": k, **r})
        mean = sum(table[k].values()) / len(table[k])
        print(f"   k={k}: mean BLEU {mean:.2f} ({time.time() - t:.0f}s)", flush=True)

    result = {"checkpoint": str(ckpt), "router": router, "experts": num_experts, "ks": ks, "directions": pairs,
              "split": args.split, "beam": args.beam, "signature": signature,
              "bleu": {str(k): table[k] for k in ks},
              "mean_bleu": {str(k): round(sum(table[k].values()) / len(table[k]), 2) for k in ks},
              "rows": rows_all}
    atomic_write_json(out / "slimmable.json", result, indent=2)
    atomic_write_text(out / "slimmable.md", markdown(ks, pairs, table, signature))
    from . import plots

    png = plots.plot_bleu_vs_k({p_: {k: table[k][p_] for k in ks} for p_ in pairs}, out / "slimmable_bleu.png",
                               title=f"{ckpt.parent.name}/{ckpt.name}: BLEU vs evaluation k (E={num_experts})")
    print(markdown(ks, pairs, table, signature))
    print(f"wrote {out / 'slimmable.json'}, {out / 'slimmable.md'} and {png}")
    return result


cli_main = main  # as the command has always run


if __name__ == "__main__":
    cli_main()
