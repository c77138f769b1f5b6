"""The runs of the Multi30k study (scripts/run_study.sh): a run's record (record.json from its
training log and evaluation), its readings at equal wall-clock and with checkpoints averaged.

The commands `record`, `equal-time` and `average` of scripts/study_report.py (the command line is
moe_fairseq/experiments/study_report.py); each takes that command's parsed arguments.
"""
import json
import os
import re
import subprocess
from pathlib import Path

from ..atomic_files import atomic_write_json
from ..moe.errors import MoEUsageError
from . import plots

DIRECTIONS = ("en-de", "en-fr", "en-cs")
SAVE_EVERY = 50  # the configs' --save-interval-updates: equal-time checkpoints are on this grid


# ------------------------------------------------------------------ reading a run

def train_summary(log: Path) -> dict:
    """Updates, training minutes, words/s and the validation curve of a fairseq json log.

    A run stopped and resumed from its checkpoint_last appends a second segment to the same log.
    Its first lines replay the updates made after that checkpoint, and fairseq 0.12's `wall` is no
    clock there: resumed within an epoch, it restores its wall stopwatch stopped, so `wall` stays at
    the checkpoint's value (0) for the whole segment; resumed at an epoch start it counts from 0
    again. Minutes are the first segment's `wall` plus each later segment's time from its lines'
    timestamps (first to last line, plus the first interval's `train_wall`); replays count, as they
    were spent. Words/s counts each update once: the replayed lines are skipped."""
    parsed = plots.parse_log(log)
    inner = parsed.get("train_inner", [])
    if not inner:
        raise MoEUsageError(f"{log}: no train_inner lines (is it a fairseq-train --log-format json log?)")
    words = seconds = 0.0
    last = 0
    for rec in inner:  # each line's wps/wpb are averages over the updates since the previous line
        if rec["num_updates"] <= last:
            continue  # replayed after a resume: these updates were counted in the first segment
        n = rec["num_updates"] - last
        last = rec["num_updates"]
        if rec.get("wps", 0) > 0:
            words += rec["wpb"] * n
            seconds += rec["wpb"] * n / rec["wps"]
    ends = sorted(parsed.get("train", []) + inner, key=lambda r: r["_line"])
    segments = [[ends[0]]]
    for prev, r in zip(ends, ends[1:]):
        # a resume: `wall` fell back (to 0 or to the checkpoint's frozen value), or updates repeat
        resumed = r.get("wall", 0.0) < prev.get("wall", 0.0) or r["num_updates"] < prev["num_updates"]
        if resumed:
            segments.append([])
        segments[-1].append(r)
    minutes = max(r.get("wall", 0.0) for r in segments[0])
    for seg in segments[1:]:
        if all("_time" in r for r in seg):
            minutes += seg[-1]["_time"] - seg[0]["_time"] + seg[0].get("train_wall", 0.0)
        else:  # a log without timestamps: `wall` is all there is
            minutes += max(r.get("wall", 0.0) for r in seg)
    threads = re.findall(r"threads=(\d+) parallel=(\d+)", log.read_text(encoding="utf-8", errors="replace"))
    # by update: a validation made after the checkpoint a run resumed from is made again
    curve = list({int(p["num_updates"]): {"updates": int(p["num_updates"]), "loss": p["loss"],
                                          "nll_loss": p.get("nll_loss")}
                  for p in plots.validation_curve(log) if "num_updates" in p and "loss" in p}.values())
    return {"updates": int(max(r["num_updates"] for r in ends)),
            "minutes": round(minutes / 60, 2),
            "wps": round(words / seconds, 1) if seconds else None,
            "threads": int(threads[-1][0]) if threads else None,
            "parallel": int(threads[-1][1]) if threads else None,
            "valid": curve}


def read_bleu(eval_dir: Path) -> tuple:
    rows = json.loads((eval_dir / "results.json").read_text())
    return {r["direction"]: r["bleu"] for r in rows}, rows[0]["signature"]


def slim_interval_checkpoints(save: Path) -> int:
    """Drop the optimizer state of checkpoint_E_U.pt files (about 2/3 of their size); written
    atomically (a crash leaves the old file)."""
    import torch

    from ..checkpoint.io import allow_checkpoint_types
    from ..checkpoint.sharded import atomic_save

    allow_checkpoint_types()  # torch.load's weights_only check: the types fairseq checkpoints hold

    done = 0
    for path in sorted(save.glob("checkpoint_*_*.pt")):
        state = torch.load(path, map_location="cpu")
        if not state.get("last_optimizer_state"):
            continue
        state["last_optimizer_state"] = None
        atomic_save(state, str(path))
        done += 1
    return done


def cmd_record(args):
    """SAVE/record.json from its training log and evaluation (SAVE/eval); with --no-eval from the
    log alone: a run continued past its budget for its validation curve (study_report.py report
    --continued), which no reading evaluates."""
    save = Path(args.save)
    rec = {"config": args.config, "seed": args.seed, **train_summary(save / "train.log")}
    if not getattr(args, "no_eval", False):
        rec["bleu"], rec["signature"] = read_bleu(save / "eval")
        rec["evaluated"] = "checkpoint_last.pt"
    flags = save / "flags.txt"  # written by scripts/study_lib.sh; absent for runs made before it
    if flags.is_file():
        rec["flags"] = flags.read_text().split()
    old = save / "record.json"
    if old.is_file():  # keep what later steps added (equal_time)
        rec = {**json.loads(old.read_text()), **rec}
    atomic_write_json(old, rec)
    slim_interval_checkpoints(save)
    print(json.dumps({k: v for k, v in rec.items() if k != "valid"}))
    return rec


def record_paths(out: Path, run=None) -> list:
    """Every finished run's record.json under OUT, or only RUN's (CONFIG/seedS) when given, so the
    driver can read a run again the moment it lands instead of after the whole rotation."""
    if run is None:
        return sorted(out.glob("*/seed*/record.json"))
    path = out / run / "record.json"
    if not path.is_file():
        raise MoEUsageError(f"--run {run}: no {path} (give a finished run as CONFIG/seedS under {out})")
    return [path]


def load_records(out: Path):
    recs = [json.loads(p.read_text()) for p in record_paths(out)]
    if not recs:
        raise MoEUsageError(f"{out}: no */seed*/record.json (run scripts/run_study.sh first)")
    return recs


# ------------------------------------------------------------------ equal wall-clock

def equal_time_update(budget: int, ratio: float) -> int:
    """The last saved update a config with throughput `ratio` x the anchor's reaches in the time
    the anchor needs for `budget` updates (rounded down to the checkpoint grid: conservative)."""
    return max(SAVE_EVERY, int(budget * ratio // SAVE_EVERY) * SAVE_EVERY)


def cmd_equal_time(args):
    out = Path(args.out)
    speed = json.loads((out / "throughput.json").read_text())
    ratios = {c: v["ratio"] for c, v in speed["configs"].items()}
    for rec_path in record_paths(out, args.run):
        rec = json.loads(rec_path.read_text())
        ratio = ratios.get(rec["config"])
        # a record read at another ratio (throughput.json measured again) is read again; the
        # evaluations are kept per update (eval_uN), so only a new update costs an evaluation
        if ratio is None or rec.get("equal_time", {}).get("ratio") == ratio:
            continue
        if ratio >= 1.0:  # as fast as the anchor or faster: its final checkpoint (capped, conservative)
            rec["equal_time"] = {"updates": rec["updates"], "bleu": rec["bleu"], "ratio": ratio, "capped": ratio > 1.0}
        else:
            upd = equal_time_update(rec["updates"], ratio)
            ckpts = sorted(rec_path.parent.glob(f"checkpoint_*_{upd}.pt"))
            if not ckpts:
                raise MoEUsageError(f"{rec_path.parent}: no interval checkpoint at update {upd} "
                                    f"(--save-interval-updates must be {SAVE_EVERY})")
            eval_dir = rec_path.parent / f"eval_u{upd}"
            if not (eval_dir / "results.json").is_file():
                evaluate(ckpts[-1], eval_dir, args)
            bleu, _ = read_bleu(eval_dir)
            rec["equal_time"] = {"updates": upd, "bleu": bleu, "ratio": ratio, "capped": False}
        atomic_write_json(rec_path, rec)
        print(f"{rec['config']} seed {rec['seed']}: equal time = {rec['equal_time']['updates']} updates")


def evaluate(checkpoint: Path, eval_dir: Path, args):
    """moe-evaluate on the test sets as scripts/run_study.sh does for the final checkpoint
    (results.json appears only once every direction is scored)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    subprocess.run(["moe-evaluate", "--path", str(checkpoint), "--lang-pairs", ",".join(DIRECTIONS),
                    "--raw-dir", str(Path(args.data) / "raw"), "--split", "test", "--beam", str(args.beam),
                    "--batch-size", "100", "--cpu", "--out", str(eval_dir), args.data],
                   check=True, stdout=subprocess.DEVNULL, env=env)


# ------------------------------------------------------------------ checkpoint averaging

def averaged_inputs(save: Path, update: int, last: int) -> list:
    """The `last` interval checkpoints ending at `update` (update, update - 50, ...), each one
    required: a missing one is an error, not a silently wider window."""
    paths = []
    for u in range(update, update - SAVE_EVERY * last, -SAVE_EVERY):
        found = sorted(save.glob(f"checkpoint_*_{u}.pt")) if u > 0 else []
        if not found:
            raise MoEUsageError(f"{save}: no interval checkpoint at update {u}, needed to average the last "
                                f"{last} ending at update {update} (--last)")
        paths.append(found[-1])
    return paths


def cmd_average(args):
    """rec["averaged"] = {"last": N, "final": {...}, "equal_time": {...}}: BLEU of the mean of the
    last N interval checkpoints at the run's final update and at its equal-time update (the same
    file when the two coincide).  The averaged checkpoint is deleted once evaluated; its
    evaluation, OUT/CONFIG/seedS/eval_avgN_uU/, is what a rerun reuses."""
    if args.last < 2:
        raise MoEUsageError(f"--last must be >= 2 (got {args.last}; 1 is the unaveraged reading)")
    out = Path(args.out)
    for rec_path in record_paths(out, args.run):
        rec, save = json.loads(rec_path.read_text()), rec_path.parent
        points = {"final": rec["updates"]}
        if "equal_time" in rec:
            points["equal_time"] = rec["equal_time"]["updates"]
        old = rec.get("averaged", {})
        if old.get("last") == args.last and all(old.get(k, {}).get("updates") == u for k, u in points.items()):
            continue
        averaged = {"last": args.last}
        for kind, upd in points.items():
            eval_dir = save / f"eval_avg{args.last}_u{upd}"
            if not (eval_dir / "results.json").is_file():
                inputs = averaged_inputs(save, upd, args.last)
                tmp = save / f"average{args.last}_u{upd}.pt"
                subprocess.run(["moe-average", "--inputs", *map(str, inputs), "--output", str(tmp)],
                               check=True, stdout=subprocess.DEVNULL)
                try:
                    evaluate(tmp, eval_dir, args)
                finally:
                    tmp.unlink(missing_ok=True)
            averaged[kind] = {"updates": upd, "bleu": read_bleu(eval_dir)[0]}
        rec["averaged"] = averaged
        atomic_write_json(rec_path, rec)
        print(f"{rec['config']} seed {rec['seed']}: last {args.last} averaged at "
              + ", ".join(f"{k} {v['updates']}" for k, v in averaged.items() if k != "last"))

