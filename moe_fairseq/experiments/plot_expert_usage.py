"""Expert usage of a MoE run: (a) tokens per expert per layer over training, (b) per language.

  python scripts/plot_expert_usage.py checkpoints/m30k_top2 --data data-bin/multi30k \
      --out-dir plots/m30k_top2 [--split valid] [--sentences 200] [--cpu] [--lang-pairs en-de,en-fr]

The training logs only hold aggregates (moe_load_cv, ...), so the usage is measured: every
checkpoint (a directory's checkpoint_E_U.pt files, written by --save-interval-updates, in update
order; or the checkpoint files given) is loaded in turn with fairseq's
load_model_ensemble_and_task (data path replaced by --data), and run in evaluation mode,
teacher-forced, on the same first N sentences of --split for every direction; each MoE
layer's `aux.stats.tokens_per_expert` (slots per expert: a top-2 token counts twice; what the
evaluation capacity dropped is not counted unless --moe-eval-capacity-factor is raised) is
summed (moe_fairseq.tools.expert_usage, shared with moe-prune).

Writes to --out-dir:
  expert_usage_over_training.png   one heatmap per MoE layer: rows = checkpoints (updates),
                                   columns = experts, colour = share of the layer's tokens
  expert_usage_per_language.png    one heatmap per MoE layer for the last checkpoint (or
                                   --language-checkpoint): rows = directions, columns = experts
  expert_usage.json                the raw counts: {checkpoint: {layer: {direction: [E counts]}}}
"""
import argparse
import json
import re
import time
from pathlib import Path

from ..tools.expert_usage import direction_batches, load_model, measure, moe_layer_names

CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)_(\d+)\.pt$")


def find_checkpoints(paths):
    """[(label, update or None, path)] in training order."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            numbered = [(int(CHECKPOINT_NAME.match(f.name).group(2)), f) for f in p.iterdir()
                        if CHECKPOINT_NAME.match(f.name)]
            if numbered:
                found += [(f"update {u}", u, f) for u, f in sorted(numbered)]
            elif (p / "checkpoint_last.pt").exists():
                found.append(("last", None, p / "checkpoint_last.pt"))
            else:
                raise SystemExit(f"plot_expert_usage: no checkpoint_E_U.pt or checkpoint_last.pt in {p}")
        elif p.is_file():
            m = CHECKPOINT_NAME.match(p.name)
            found.append((f"update {m.group(2)}" if m else p.stem, int(m.group(2)) if m else None, p))
        else:
            raise SystemExit(f"plot_expert_usage: no such checkpoint or directory: {p}")
    if any(u is None for _, u, _ in found):
        return found  # keep the given order when some files carry no update number
    return sorted(found, key=lambda item: item[1])


def shares(rows):
    import numpy as np

    a = np.asarray(rows, dtype=float)
    sums = a.sum(axis=1, keepdims=True)
    return np.divide(a, sums, out=np.zeros_like(a), where=sums > 0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("checkpoints", nargs="+", help="a save dir (its checkpoint_E_U.pt files) or checkpoint files")
    p.add_argument("--data", required=True, help="data-bin directory (overrides the path saved in the checkpoints)")
    p.add_argument("--out-dir", default="expert_usage", help="where the PNGs and JSON go")
    p.add_argument("--split", default="valid", help="data split for the fixed batch (default valid)")
    p.add_argument("--sentences", type=int, default=200, help="sentences per direction (default 200)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per forward pass (default 64)")
    p.add_argument("--lang-pairs", help="directions to measure (default: the checkpoint's --lang-pairs)")
    p.add_argument("--language-checkpoint", help="checkpoint for the per-language plot (default: the last one)")
    p.add_argument("--moe-eval-top-k", type=int, help="evaluation k for noisy_topk/random routers")
    p.add_argument("--moe-eval-capacity-factor", type=float,
                   help="evaluation capacity factor; a large value (e.g. 1000) counts the router's choices "
                        "before capacity dropping (default: as trained, i.e. what inference computes)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    p.add_argument("--verbose", action="store_true", help="show fairseq's INFO logging")
    args = p.parse_args(argv)

    import logging

    import torch

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    for name in ("fairseq", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.INFO if args.verbose and name == "fairseq" else logging.WARNING)
    from ..models.transformer_moe import apply_eval_overrides
    from . import plots

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    ckpts = find_checkpoints(args.checkpoints)
    n_training = len(ckpts)  # rows of the over-training plot
    lang_path = Path(args.language_checkpoint) if args.language_checkpoint else ckpts[-1][2]
    if all(Path(path).resolve() != lang_path.resolve() for _, _, path in ckpts):
        ckpts.append((lang_path.stem, None, lang_path))  # measured for the per-language plot only
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{len(ckpts)} checkpoint(s), device {device}", flush=True)

    results, batches, pairs, layer_names = {}, None, None, None
    start = time.time()
    for i, (label, update, path) in enumerate(ckpts, 1):
        model, cfg = load_model(path, args.data)
        model = model.to(device)
        apply_eval_overrides(model, args.moe_eval_top_k, args.moe_eval_capacity_factor)
        if batches is None:
            pairs = args.lang_pairs.split(",") if args.lang_pairs else list(cfg.task.lang_pairs)
            batches = direction_batches(cfg, args.data, pairs, args.split, args.sentences, args.batch_size)
            layer_names = [name for name, _ in moe_layer_names(model)]
            if not layer_names:
                raise SystemExit(f"plot_expert_usage: {path} has no MoE layer (a dense model?)")
            print(f"{len(layer_names)} MoE layers; directions {', '.join(pairs)}; "
                  f"{sum(len(b) for b in batches.values())} batches of {args.split}", flush=True)
        results[str(Path(path).resolve())] = {"label": label, "update": update, "counts": measure(model, batches, device)}
        print(f"[{i}/{len(ckpts)}] {path.name} ({label}) done, {time.time() - start:.0f}s elapsed", flush=True)
        del model

    (out_dir / "expert_usage.json").write_text(json.dumps(
        {"split": args.split, "sentences_per_direction": args.sentences, "directions": pairs,
         "layers": layer_names, "checkpoints": results}, indent=1) + "\n")

    training = list(results.values())[:n_training]
    over_time = {name: shares([[sum(col) for col in zip(*r["counts"][name].values())] for r in training])
                 for name in layer_names}
    png_a = plots.plot_heatmaps(over_time, [r["label"] for r in training],
                                out_dir / "expert_usage_over_training.png", ylabel="checkpoint",
                                title=f"share of tokens per expert over training ({args.split}, all directions)")
    last = results[str(lang_path.resolve())]
    per_lang = {name: shares([last["counts"][name][pair] for pair in pairs]) for name in layer_names}
    png_b = plots.plot_heatmaps(per_lang, pairs, out_dir / "expert_usage_per_language.png", ylabel="direction",
                                title=f"share of tokens per expert by direction ({last['label']})")
    print(f"wrote {png_a}, {png_b} and {out_dir / 'expert_usage.json'}")
    return results


cli_main = main  # as the command has always run


if __name__ == "__main__":
    cli_main()
