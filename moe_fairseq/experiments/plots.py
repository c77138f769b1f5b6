"""Parsing of fairseq training logs and the PNG figures of the experiments (the study, the plot,
pruning and slimmable scripts); use_agg and save_figure for a figure of one's own.
Needs matplotlib (Agg backend, no display) and numpy, not fairseq (the GPU check reads its
training logs with parse_log before anything imports fairseq; see docs/ARCHITECTURE.md).

Log formats understood (what `fairseq-train` writes to stdout, e.g. SAVE_DIR/train.log of
scripts/train.sh), with or without fairseq_cli's "2024-01-01 12:00:00 | INFO | " prefix:

  --log-format json:    ... | INFO | valid | {"epoch": 1, "valid_loss": "8.17", ..., "valid_num_updates": "500"}
                        ... | INFO | train_inner | {"epoch": 1, "update": 0.1, "loss": "8.0", ..., "wall": "31"}
  --log-format simple:  ... | INFO | valid | epoch 001 | valid on 'valid' subset | loss 8.17 | ... | num_updates 500
                        ... | INFO | train_inner | epoch 001:    100 / 330 loss=8.0, ..., num_updates=100, wall=31

fairseq's validation lines carry no wall-clock time.  A validation point's time is, in order of
preference: its own `wall` field (if a fork logs one); the `wall` of the last training line
before it plus the time between the two lines' timestamps; that `wall` alone.  `wall` is the
trainer's elapsed-time meter, which is saved in checkpoints, so a resumed run continues from
where it stopped instead of counting the time between jobs.
"""
import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Sequence

TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")
# the tag is a field of its own: "| valid |", "INFO:valid:" or the start of the line
TAGGED = re.compile(r"(?:^|\|\s|INFO:)(train_inner|train|valid\w*)\s*[|:]\s?(.*)$")
NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?(inf|nan)$")


def _number(text):
    text = str(text).strip()
    return float(text) if NUMBER.match(text) else None


def _parse_body(tag: str, body: str) -> Optional[Dict[str, float]]:
    body = body.strip()
    values = {}
    if body.startswith("{"):
        try:
            raw = json.loads(body)
        except ValueError:
            return None
        prefix = tag + "_"
        for key, value in raw.items():
            number = _number(value)
            if number is None:
                continue
            values[key[len(prefix):] if key.startswith(prefix) else key] = number
        return values
    if tag == "train_inner":  # "epoch 001:    100 / 330 loss=8.0, nll_loss=7.9, ..."
        for key, value in re.findall(r"([A-Za-z_][\w]*)=([^,\s]+)", body):
            number = _number(value)
            if number is not None:
                values[key] = number
        return values or None
    for field in body.split(" | "):  # "epoch 001 | valid on 'valid' subset | loss 8.17 | ..."
        parts = field.strip().split(" ")
        if len(parts) == 2:
            number = _number(parts[1])
            if number is not None:
                values[parts[0]] = number
    return values or None


def _records(path):
    """(tag, record, timestamp or None, line number) for every tagged log line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            m = TAGGED.search(line.rstrip("\n"))
            if not m:
                continue
            record = _parse_body(m.group(1), m.group(2))
            if not record:
                continue
            ts = TIMESTAMP.match(line)
            t = datetime.strptime(ts.group(1), "%Y-%m-%d %H:%M:%S").timestamp() if ts else None
            yield m.group(1), record, t, lineno


def parse_log(path) -> Dict[str, List[Dict[str, float]]]:
    """{tag: [record, ...]} for the train_inner, train and valid* lines of a fairseq log.

    Each record maps metric names (prefix such as `valid_` removed) to floats, plus `_time`
    (seconds since the epoch, from the line's timestamp, when there is one) and `_line`."""
    out: Dict[str, List[Dict[str, float]]] = {}
    for tag, record, t, lineno in _records(path):
        if t is not None:
            record["_time"] = t
        record["_line"] = lineno
        out.setdefault(tag, []).append(record)
    return out


def validation_curve(path, subset: str = "valid") -> List[Dict[str, float]]:
    """Validation records of a log in file order, each with `wall` (seconds of training) and
    `num_updates` filled in as well as the log allows (see the module docstring)."""
    points, last_train = [], None
    for tag, record, t, lineno in _records(path):
        if tag in ("train_inner", "train"):
            if "wall" in record:
                last_train = (record["wall"], t, record.get("num_updates"))
            continue
        if tag != subset:
            continue
        point = dict(record)
        if "wall" not in point and last_train is not None:
            wall, t_train, _ = last_train
            point["wall"] = wall + (t - t_train if t is not None and t_train is not None else 0.0)
        if "num_updates" not in point and last_train is not None and last_train[2] is not None:
            point["num_updates"] = last_train[2]
        point["_line"] = lineno
        points.append(point)
    return points


def use_agg():
    """matplotlib.pyplot on the Agg backend (no display), its loggers quiet."""
    import logging

    # fairseq's CLI modules configure the root logger; matplotlib's font search would flood it.
    for name in ("matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _time_axis(seconds_max: float):
    if seconds_max < 120:
        return 1.0, "wall-clock time (s)"
    if seconds_max < 2 * 3600:
        return 60.0, "wall-clock time (min)"
    return 3600.0, "wall-clock time (h)"


def plot_convergence(runs: Dict[str, List[Dict[str, float]]], out, metrics=("loss", "nll_loss"),
                     x: str = "wall", title: Optional[str] = None) -> Path:
    """One panel per metric, one line per run: validation metric against wall-clock time
    (x="wall") or updates (x="num_updates")."""
    plt = use_agg()
    metrics = [m for m in metrics if any(m in p for pts in runs.values() for p in pts)] or list(metrics[:1])
    xmax = max((p.get(x, 0.0) for pts in runs.values() for p in pts), default=0.0)
    scale, xlabel = _time_axis(xmax) if x == "wall" else (1.0, "updates")
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, pts in runs.items():
            xy = [(p[x] / scale, p[metric]) for p in pts if x in p and metric in p]
            if xy:
                xs, ys = zip(*xy)
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"validation {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


def save_figure(fig, out) -> Path:
    """Lay out, write as PNG (creating the directory) and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _grid(n: int):
    cols = min(n, 3)
    return (n + cols - 1) // cols, cols


def plot_heatmaps(panels: Dict[str, "object"], row_labels: Sequence[str], out, xlabel="expert",
                  ylabel="", title: Optional[str] = None, value_label="share of tokens") -> Path:
    """One heatmap per panel (e.g. per MoE layer): rows = row_labels, columns = experts."""
    import numpy as np

    plt = use_agg()
    names = list(panels)
    nrows, ncols = _grid(len(names))
    height = max(2.5, 0.28 * len(row_labels) + 1.6)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.8 * ncols + 1.2, height * nrows + 0.5), squeeze=False,
                             constrained_layout=True)
    vmax = max(float(np.max(panels[n])) for n in names) if names else 1.0
    image = None
    for i, name in enumerate(names):
        ax = axes[i // ncols][i % ncols]
        data = np.asarray(panels[name], dtype=float)
        image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax or 1.0,
                          interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(data.shape[1]))
        ax.set_xlabel(xlabel)
        ax.set_yticks(range(len(row_labels)))
        ax.set_yticklabels(row_labels, fontsize=7)
        if i % ncols == 0:
            ax.set_ylabel(ylabel)
    for j in range(len(names), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9, label=value_label)
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_bleu_vs_k(results: Dict[str, Dict[int, float]], out, title: Optional[str] = None) -> Path:
    """results: {direction: {k: BLEU}}; one line per direction plus their mean."""
    plt = use_agg()
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = sorted({k for per_k in results.values() for k in per_k})
    for direction, per_k in results.items():
        xs = sorted(per_k)
        ax.plot(xs, [per_k[k] for k in xs], marker="o", label=direction)
    if len(results) > 1:
        mean = [sum(r[k] for r in results.values() if k in r) / sum(1 for r in results.values() if k in r) for k in ks]
        ax.plot(ks, mean, marker="s", color="black", linewidth=2, label="mean")
    if ks and ks[-1] > 1 and all(k > 0 and math.log2(k).is_integer() for k in ks):
        ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("experts per token at evaluation (k)")
    ax.set_ylabel("BLEU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return save_figure(fig, out)


def plot_seed_bands(curves: Dict[str, List[List[tuple]]], out, ylabel: str, xlabel: str,
                    title: Optional[str] = None) -> Path:
    """curves: {config: [[(x, y), ...] one list per seed]}.  One line per config: the mean over the
    seeds at the x values every seed has, with a band from the lowest to the highest seed."""
    import numpy as np

    plt = use_agg()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, seeds in curves.items():
        common = sorted(set.intersection(*[{x for x, _ in s} for s in seeds])) if seeds else []
        if not common:
            continue
        ys = np.array([[dict(s)[x] for x in common] for s in seeds])
        line, = ax.plot(common, ys.mean(axis=0), marker="o", markersize=3, label=f"{label} (n={len(seeds)})")
        if len(seeds) > 1:
            ax.fill_between(common, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, out)
