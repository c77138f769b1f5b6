"""Is run B's BLEU really better than run A's?  sacrebleu's paired bootstrap over the saved
`moe-evaluate` outputs of several runs, per direction and over all directions pooled.

  python scripts/compare_runs.py study/dense/eval study/moe_top2/eval study/moe_top2_gate_drop/eval \
      --labels dense,moe_top2,gate_drop --raw-dir data-bin/multi30k/raw --split test \
      [--baseline moe_top2] [--samples 1000] [--out study/significance]

Each run directory holds `generate.<split>.<src>-<tgt>.txt` (written by `moe-evaluate --out`).
Hypotheses are aligned to the references by sentence id, as in moe-evaluate, and a missing
sentence is refused.  The test is sacrebleu's own (`sacrebleu.significance.PairedTest`, paired
bootstrap resampling, Koehn 2004, seed fixed by SACREBLEU_SEED, default 12345): for every system
the bootstrap mean BLEU with its 95% confidence interval, and the two-sided p-value of "no
difference from the baseline" (sacrebleu tests the absolute BLEU difference; for two identical
systems it reports its floor, 1 / (samples + 1), not 1).  One training seed per run, so this measures test-set sampling noise only, not
run-to-run training variance.  Writes significance.md and significance.json to --out.
"""
import argparse
import json
import re
from pathlib import Path

from ..moe.errors import MoEUsageError
from ..tools.evaluate import align, find_references, parse_generate_output, read_lines
from .cli import one_line_errors

POOLED = "all"


def directions(run_dir: Path, split: str):
    pattern = re.compile(rf"^generate\.{re.escape(split)}\.(\w+-\w+)\.txt$")
    return sorted(m.group(1) for p in run_dir.iterdir() if (m := pattern.match(p.name)))


def load_runs(run_dirs, split):
    """[{direction: {id: hyp}}] per run; every run must hold the same directions."""
    per_run, first = [], None
    for d in run_dirs:
        d = Path(d)
        if not d.is_dir():
            raise MoEUsageError(f"run directory {d} does not exist (expected moe-evaluate --out output)")
        dirs = directions(d, split)
        if not dirs:
            raise MoEUsageError(f"{d}: no generate.{split}.<src>-<tgt>.txt files (run moe-evaluate --out {d})")
        if first is not None and dirs != first:
            raise MoEUsageError(f"{d} has directions {dirs}, the first run has {first}: compare like with like")
        first = dirs
        per_run.append({pair: parse_generate_output((d / f"generate.{split}.{pair}.txt").read_text(encoding="utf-8"))
                        for pair in dirs})
    return first, per_run


def paired_bootstrap(named_systems, refs, samples):
    """[{system, bleu, mean, ci95, p_value (None for the baseline)}], baseline first, from sacrebleu's PairedTest."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    test = PairedTest(named_systems, {"BLEU": BLEU()}, [refs], test_type="bs", n_samples=samples)
    signatures, scores = test()
    rows = []
    for name, result in zip(scores["System"], scores["BLEU"]):
        rows.append({"system": name, "bleu": round(result.score, 2), "mean": round(result.mean, 2),
                     "ci95": round(result.ci, 2),
                     "p_value": None if result.p_value is None else round(result.p_value, 4)})
    return rows, str(signatures["BLEU"])


def compare(run_dirs, labels, raw_dir, split, baseline, samples):
    if len(labels) != len(run_dirs):
        raise MoEUsageError(f"--labels has {len(labels)} names for {len(run_dirs)} run directories")
    if baseline not in labels:
        raise MoEUsageError(f"--baseline {baseline!r} is not one of the labels {labels}")
    pairs, per_run = load_runs(run_dirs, split)
    order = [labels.index(baseline)] + [i for i in range(len(labels)) if labels[i] != baseline]
    hyps = {POOLED: [[] for _ in labels]}
    refs = {POOLED: []}
    for pair in pairs:
        src, tgt = pair.split("-")
        refs[pair] = read_lines(find_references(Path(raw_dir), split, src, tgt))
        refs[POOLED] += refs[pair]
        hyps[pair] = [align(run[pair], len(refs[pair]), False, f"{labels[i]} {pair}") for i, run in enumerate(per_run)]
        for i in range(len(labels)):
            hyps[POOLED][i] += hyps[pair][i]
    table, signature = {}, None
    for key in pairs + [POOLED]:
        named = [(labels[i], hyps[key][i]) for i in order]
        table[key], signature = paired_bootstrap(named, refs[key], samples)
        print(f"{key}: " + ", ".join(f"{r['system']} {r['bleu']:.2f}" for r in table[key]), flush=True)
    return {"baseline": baseline, "split": split, "samples": samples, "signature": signature,
            "directions": pairs, "table": table}


def markdown(result) -> str:
    keys = result["directions"] + [POOLED]
    names = [r["system"] for r in result["table"][keys[0]]]
    lines = ["| system | " + " | ".join(k if k != POOLED else "all (pooled)" for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for i, name in enumerate(names):
        cells = []
        for k in keys:
            r = result["table"][k][i]
            cell = f"{r['mean']:.2f} ± {r['ci95']:.2f}"
            if r["p_value"] is not None:
                cell += f" (p = {r['p_value']:.3f})"
            cells.append(cell)
        lines.append(f"| {name}{' (baseline)' if i == 0 else ''} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Bootstrap mean BLEU ± 95% CI half-width, p-value of a paired bootstrap test against "
                 f"{result['baseline']} ({result['samples']} resamples); sacrebleu `{result['signature']}`.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="moe-evaluate --out directories, one per run")
    p.add_argument("--labels", help="comma-separated names, one per run (default: the directory names)")
    p.add_argument("--raw-dir", required=True, help="directory with the raw references (as for moe-evaluate)")
    p.add_argument("--split", default="test")
    p.add_argument("--baseline", help="label of the baseline run (default: the first)")
    p.add_argument("--samples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--out", help="write significance.md and significance.json here")
    args = p.parse_args(argv)
    # default names: the directory's own name, or its run's name for the run_study layout RUN/eval
    labels = args.labels.split(",") if args.labels else [
        Path(r).resolve().parent.name if Path(r).resolve().name == "eval" else Path(r).resolve().name for r in args.runs]
    if len(set(labels)) != len(labels):
        raise MoEUsageError(f"run names {labels} are not unique: give --labels")
    if args.samples < 100:
        raise MoEUsageError(f"--samples {args.samples}: use at least 100 bootstrap resamples")
    result = compare(args.runs, labels, args.raw_dir, args.split, args.baseline or labels[0], args.samples)
    text = markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "significance.md").write_text(text, encoding="utf-8")
        (out / "significance.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(f"wrote {out / 'significance.md'} and {out / 'significance.json'}")
    return result


cli_main = one_line_errors(main)


if __name__ == "__main__":
    cli_main()
