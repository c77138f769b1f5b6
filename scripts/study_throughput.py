#!/usr/bin/env python
"""Training speed of the study's configs, side by side: what "equal wall-clock" rests on.

  python scripts/study_throughput.py --data data-bin/multi30k \
      --configs fairseq_dense,dense,moe_top2,smoe_dropout --anchor fairseq_dense --out study/throughput.json \
      [--rounds 3] [--warmup 10] [--updates 30] [--threads 2]

Each config of configs/multi30k trains WARMUP + UPDATES updates (no validation, no checkpoint),
ROUNDS times, the configs interleaved and their order rotated each round, so that the host's
drift touches every config alike.  The speed of one measurement is the words and updates of
the logged intervals after the warmup divided by their time (fairseq's per-interval wps/wpb, which
are timed with sub-second resolution).  A config's ratio to the anchor is the median over rounds
of (config / anchor in that round); the medians of the absolute speeds are reported beside it.

SMoE-Dropout's cost depends on k, which its schedule grows during the run: it is timed at
k = 1, 2, 4 and E (--moe-top-k-schedule fixed), the time per update of the other k interpolated
linearly, and averaged over the k of every update of its schedule (--moe-top-k-schedule-steps
over --max-update of its config).  Run nothing else meanwhile: this is the only timed step of
the study.  OMP_WAIT_POLICY is left as the environment has it (recorded in the output).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from moe_fairseq.atomic_files import atomic_write_json  # noqa: E402
from moe_fairseq.experiments import launch  # noqa: E402
from moe_fairseq.moe.errors import MoEUsageError  # noqa: E402
from moe_fairseq.moe.k_schedule import KSchedule  # noqa: E402

ANCHORS_WITHOUT_PLUGIN = ("fairseq_dense",)
LOG_INTERVAL = 5


def config_args(name):
    return launch.config_args(REPO / "configs" / "multi30k" / f"{name}.args")


def flag(args, name, default=None):
    return args[len(args) - 1 - args[::-1].index(name) + 1] if name in args else default


def measure(data, name, extra, warmup, updates, threads):
    """(updates/s, words/s) of one short training run after its warmup."""
    args = config_args(name)
    user_dir = [] if name in ANCHORS_WITHOUT_PLUGIN else ["--user-dir", str(REPO / "moe_fairseq")]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["fairseq-train", data, *user_dir, *args, "--save-dir", tmp, "--cpu", "--num-workers", "0",
               "--max-update", str(warmup + updates), "--disable-validation", "--no-save",
               "--log-format", "json", "--log-interval", str(LOG_INTERVAL), *extra]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: fairseq-train failed:\n{proc.stderr[-2000:]}")
    words = seconds = n_upd = 0.0
    for line in proc.stdout.splitlines() + proc.stderr.splitlines():
        if "| train_inner |" not in line:
            continue
        rec = json.loads(line.split("| train_inner |", 1)[1])
        if int(rec["num_updates"]) <= warmup:
            continue
        wpb, wps = float(rec["wpb"]), float(rec["wps"])
        words += wpb * LOG_INTERVAL
        seconds += wpb * LOG_INTERVAL / wps
        n_upd += LOG_INTERVAL
    if not seconds:
        raise RuntimeError(f"{name}: no timed intervals after {warmup} warmup updates")
    return n_upd / seconds, words / seconds


def variants(name):
    """[(label, extra flags)]: one per timed setting of the config."""
    args = config_args(name)
    if flag(args, "--moe-router") != "random":
        return [(name, [])]
    kmax = int(flag(args, "--moe-top-k-max", flag(args, "--moe-expert-count")))
    ks = sorted({k for k in (1, 2, 4, kmax) if k <= kmax})
    return [(f"{name}@k{k}", ["--moe-top-k-schedule", "fixed", "--moe-top-k-min", "1", "--moe-top-k-max", str(k)])
            for k in ks]


def schedule_cost(name, per_k_seconds):
    """Mean seconds per update of a random-router config over its own k schedule."""
    args = config_args(name)
    sched = KSchedule(int(flag(args, "--moe-top-k-min", 1)), int(flag(args, "--moe-top-k-max")),
                      int(flag(args, "--moe-top-k-schedule-steps", 1)), flag(args, "--moe-top-k-schedule", "linear"))
    ks = sorted(per_k_seconds)

    def seconds(k):
        if k in per_k_seconds:
            return per_k_seconds[k]
        lo = max(x for x in ks if x < k)
        hi = min(x for x in ks if x > k)
        return per_k_seconds[lo] + (per_k_seconds[hi] - per_k_seconds[lo]) * (k - lo) / (hi - lo)

    total = int(flag(args, "--max-update"))
    return sum(seconds(sched(t)) for t in range(total)) / total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--configs", required=True, help="comma-separated names of configs/multi30k/*.args")
    p.add_argument("--anchor", default="fairseq_dense")
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--updates", type=int, default=30)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--conditions", default="nothing else running",
                   help="what else ran on the host meanwhile (recorded and printed by the report)")
    args = p.parse_args(argv)
    names = args.configs.split(",")
    if args.anchor not in names:
        raise MoEUsageError(f"--anchor {args.anchor} is not one of --configs")
    if args.updates < LOG_INTERVAL or args.updates % LOG_INTERVAL or args.warmup % LOG_INTERVAL:
        raise MoEUsageError(f"--updates and --warmup must be multiples of {LOG_INTERVAL} (--updates >= {LOG_INTERVAL})")
    settings = [v for n in names for v in variants(n)]
    raw = {label: [] for label, _ in settings}
    start = time.time()
    for r in range(args.rounds):
        order = settings[r % len(settings):] + settings[:r % len(settings)]
        for label, extra in order:
            ups, wps = measure(args.data, label.split("@")[0], extra, args.warmup, args.updates, args.threads)
            raw[label].append({"round": r, "ups": ups, "wps": wps})
            print(f"round {r + 1}/{args.rounds} {label}: {ups:.3f} updates/s, {wps:.0f} words/s "
                  f"({time.time() - start:.0f}s)", flush=True)
    anchor = [m["ups"] for m in raw[args.anchor]]
    configs = {}
    for name in names:
        labels = [label for label, _ in variants(name)]
        if len(labels) == 1:
            per_round_s = [1.0 / m["ups"] for m in raw[labels[0]]]
            wps = statistics.median(m["wps"] for m in raw[labels[0]])
        else:  # random router: average over its k schedule, round by round
            per_round_s = [schedule_cost(name, {int(lb.split("@k")[1]): 1.0 / raw[lb][r]["ups"] for lb in labels})
                           for r in range(args.rounds)]
            words_per_update = statistics.median(raw[labels[-1]][r]["wps"] / raw[labels[-1]][r]["ups"]
                                                 for r in range(args.rounds))
            wps = words_per_update / statistics.median(per_round_s)
        configs[name] = {"ups": 1.0 / statistics.median(per_round_s), "wps": wps,
                         "ratio": statistics.median((1.0 / s) / a for s, a in zip(per_round_s, anchor)),
                         "ratio_of_medians": (1.0 / statistics.median(per_round_s)) / statistics.median(anchor)}
    result = {"anchor": args.anchor, "rounds": args.rounds, "warmup": args.warmup, "updates": args.updates,
              "threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
              "conditions": args.conditions,
              "date": time.strftime("%Y-%m-%d %H:%M"), "configs": configs, "raw": raw}
    atomic_write_json(args.out, result)
    print("| config | updates/s | words/s | ratio to anchor (paired median) | ratio of medians |")
    print("|---|---|---|---|---|")
    for name, v in configs.items():
        print(f"| {name} | {v['ups']:.3f} | {v['wps']:.0f} | {v['ratio']:.3f} | {v['ratio_of_medians']:.3f} |")
    return result


if __name__ == "__main__":
    from moe_fairseq.cli_errors import install_excepthook

    install_excepthook()
    main()
