"""Validation loss and nll_loss against wall-clock time for several runs, from fairseq logs.

  python scripts/plot_convergence.py checkpoints/m30k_dense/train.log checkpoints/m30k_top2/train.log \
      --out plots/convergence.png [--labels dense,top2] [--x updates] [--metrics loss,nll_loss,bleu]

A log is what fairseq-train printed (scripts/train.sh appends it to SAVE_DIR/train.log), in
--log-format json or simple.  Validation lines carry no time, so a point's time is the
trainer's `wall` meter of the last training line before it plus the time between the two
lines' timestamps (see moe_fairseq/experiments/plots.py).  A run is labelled by its log's directory name
unless --labels is given.  Also writes the parsed points next to the PNG (.json).
"""
import argparse
import json
import sys
from pathlib import Path


def run_label(path: Path, used) -> str:
    label = path.parent.name if path.stem in ("train", "log", "stdout") and path.parent.name else path.stem
    base, i = label, 2
    while label in used:
        label, i = f"{base}-{i}", i + 1
    return label


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("logs", nargs="+", help="fairseq-train logs (json or simple format)")
    p.add_argument("--labels", help="comma-separated run names, one per log")
    p.add_argument("--out", default="convergence.png", help="PNG to write (default convergence.png)")
    p.add_argument("--x", choices=("wall", "updates"), default="wall", help="x axis (default wall-clock time)")
    p.add_argument("--metrics", default="loss,nll_loss", help="validation metrics, one panel each")
    p.add_argument("--subset", default="valid", help="validation subset tag in the log (default valid)")
    p.add_argument("--title")
    args = p.parse_args(argv)

    from . import plots

    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(args.logs):
        p.error(f"--labels has {len(labels)} names for {len(args.logs)} logs")
    runs = {}
    for i, log in enumerate(args.logs):
        path = Path(log)
        if not path.is_file():
            p.error(f"no such log: {log}")
        label = labels[i] if labels else run_label(path, runs)
        points = plots.validation_curve(path, args.subset)
        print(f"{label}: {len(points)} validation points from {path}", flush=True)
        if not points:
            print(f"  warning: no '{args.subset}' lines in {path} (is it a fairseq-train log?)", file=sys.stderr)
        runs[label] = points
    if not any(runs.values()):
        sys.exit("plot_convergence: no validation points in any log")
    x = "wall" if args.x == "wall" else "num_updates"
    out = plots.plot_convergence(runs, args.out, metrics=args.metrics.split(","), x=x, title=args.title)
    data = {label: [{k: v for k, v in pt.items() if not k.startswith("_")} for pt in pts]
            for label, pts in runs.items()}
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return out


cli_main = main  # as the command has always run


if __name__ == "__main__":
    cli_main()
