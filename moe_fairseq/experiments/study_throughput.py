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

A config may also be named with flags of its own, NAME=CONFIG:FLAG,VALUE,... (the syntax of
scripts/run_emulated_study.sh), e.g. gate_drop_p0.1=moe_top2_gate_drop:--moe-gating-dropout,0.1.

Emulated cluster (--emulated-rate-mbit R, as root): every measurement trains on 2 emulated nodes
(scripts/emulated_cluster.py, one rank each, --threads per rank, gloo over a link shaped to R
Mbit/s, 0 unshaped), expert parallel, with --extra appended (e.g. the study's per-rank
--max-tokens).  Rounds are kept in --out as they land and a rerun adds rounds to them until
--rounds are done; --rounds-now N stops after N new rounds, so a driver can time a round between
two training runs instead of all rounds at once.
"""
import argparse
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..atomic_files import atomic_write_json
from ..moe.errors import MoEUsageError
from ..moe.k_schedule import KSchedule
from . import launch
from .cli import one_line_errors
from .launch import REPO

ANCHORS_WITHOUT_PLUGIN = ("fairseq_dense",)
LOG_INTERVAL = 5


def parse_spec(spec):
    """NAME=CONFIG:FLAG,VALUE,... or CONFIG -> (name, config, [flags])."""
    name, _, rest = spec.partition("=")
    if not rest:
        return spec, spec, []
    config, _, flags = rest.partition(":")
    return name, config, [t for t in flags.split(",") if t]


def config_args(name):
    return launch.config_args(REPO / "configs" / "multi30k" / f"{name}.args")


def flag(args, name, default=None):
    return args[len(args) - 1 - args[::-1].index(name) + 1] if name in args else default


def emulated_command(train_cmd, rate_mbit, log_dir):
    """train_cmd (fairseq-train and its flags) on 2 emulated nodes, one rank each, gloo over a link
    shaped to rate_mbit; fairseq's lines (rank 0) end up in log_dir/node0.log."""
    import shlex

    torchrun = ["torchrun", "--nproc_per_node", "1", "--nnodes", "2", "--node_rank", "$NODE_RANK",
                "--master_addr", "$MASTER_ADDR", "--master_port", "$MASTER_PORT", shutil.which("fairseq-train"),
                *train_cmd[1:], "--distributed-world-size", "2", "--distributed-backend", "gloo"]
    line = " ".join(f'"{t}"' if t.startswith("$") else shlex.quote(t) for t in torchrun)
    return [sys.executable, str(REPO / "scripts" / "emulated_cluster.py"), "--nodes", "2", "--rate-mbit",
            str(rate_mbit), "--quiet", "--log-dir", log_dir, "--grace", "30", "--", "bash", "-c", "exec " + line]


def measure(data, name, extra, warmup, updates, threads, rate_mbit=None):
    """(updates/s, words/s) of one short training run after its warmup (on the emulated cluster
    when rate_mbit is not None)."""
    run, config, flags = parse_spec(name)
    args = config_args(config) + flags
    user_dir = [] if config in ANCHORS_WITHOUT_PLUGIN and rate_mbit is None else ["--user-dir", str(REPO / "moe_fairseq")]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["fairseq-train", data, *user_dir, *args, "--save-dir", tmp, "--cpu", "--num-workers", "0",
               "--max-update", str(warmup + updates), "--disable-validation", "--no-save",
               "--log-format", "json", "--log-interval", str(LOG_INTERVAL), *extra]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if rate_mbit is not None:
            cmd = emulated_command(cmd, rate_mbit, tmp)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        output = proc.stdout.splitlines() + proc.stderr.splitlines()
        if rate_mbit is not None and os.path.isfile(os.path.join(tmp, "node0.log")):
            output = Path(tmp, "node0.log").read_text().splitlines()
    if proc.returncode != 0:
        raise RuntimeError(f"{run}: fairseq-train failed:\n" + "\n".join(output[-30:]))
    words = seconds = n_upd = 0.0
    for line in output:
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
        raise RuntimeError(f"{run}: no timed intervals after {warmup} warmup updates")
    return n_upd / seconds, words / seconds


def variants(name):
    """[(label, extra flags)]: one per timed setting of the config (labels carry the run's name;
    measure() gets the spec back from spec_of)."""
    run, config, flags = parse_spec(name)
    args = config_args(config) + flags
    if flag(args, "--moe-router") != "random":
        return [(run, [])]
    kmax = int(flag(args, "--moe-top-k-max", flag(args, "--moe-expert-count")))
    ks = sorted({k for k in (1, 2, 4, kmax) if k <= kmax})
    return [(f"{run}@k{k}", ["--moe-top-k-schedule", "fixed", "--moe-top-k-min", "1", "--moe-top-k-max", str(k)])
            for k in ks]


def schedule_cost(name, per_k_seconds):
    """Mean seconds per update of a random-router config over its own k schedule."""
    _, config, flags = parse_spec(name)
    args = config_args(config) + flags
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


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--configs", required=True,
                   help="comma-separated configs/multi30k names, or space-separated NAME=CONFIG:FLAG,VALUE,... specs")
    p.add_argument("--anchor", default="fairseq_dense")
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rounds-now", type=int, help="stop after this many new rounds (the rest on a rerun)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--updates", type=int, default=30)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--emulated-rate-mbit", type=float,
                   help="train on 2 emulated nodes over a link of this rate (0: unshaped; needs root)")
    p.add_argument("--extra", default="", help="more fairseq-train flags for every measurement, space-separated")
    p.add_argument("--conditions", default="nothing else running",
                   help="what else ran on the host meanwhile (recorded and printed by the report)")
    return p


def config_names(configs):
    """--configs: 'a,b,c' (config names) or 'x=CONFIG:F,V y=...' (specs, which contain commas)."""
    return configs.split() if "=" in configs else configs.split(",")


def summarize(names, raw, rounds, anchor_name):
    """{name: {"ups", "wps", "ratio", "ratio_of_medians"}} over the first `rounds` rounds."""
    anchor = [m["ups"] for m in raw[anchor_name][:rounds]]
    configs = {}
    for name in names:
        labels = [label for label, _ in variants(name)]
        key = parse_spec(name)[0]
        if len(labels) == 1:
            per_round_s = [1.0 / m["ups"] for m in raw[labels[0]][:rounds]]
            wps = statistics.median(m["wps"] for m in raw[labels[0]][:rounds])
        else:  # random router: average over its k schedule, round by round
            per_round_s = [schedule_cost(name, {int(lb.split("@k")[1]): 1.0 / raw[lb][r]["ups"] for lb in labels})
                           for r in range(rounds)]
            words_per_update = statistics.median(raw[labels[-1]][r]["wps"] / raw[labels[-1]][r]["ups"]
                                                 for r in range(rounds))
            wps = words_per_update / statistics.median(per_round_s)
        configs[key] = {"ups": 1.0 / statistics.median(per_round_s), "wps": wps,
                        "ratio": statistics.median((1.0 / s) / a for s, a in zip(per_round_s, anchor)),
                        "ratio_of_medians": (1.0 / statistics.median(per_round_s)) / statistics.median(anchor)}
    return configs


def load_previous(args, labels):
    """The rounds an earlier run of the same measurement stored in --out (none if it measured
    something else: then it is not resumed but refused, so no mixture of settings is averaged)."""
    out = Path(args.out)
    if not out.is_file():
        return {label: [] for label in labels}
    old = json.loads(out.read_text())
    same = {k: old.get(k) for k in ("warmup", "updates", "threads", "emulated_rate_mbit", "extra")}
    want = {"warmup": args.warmup, "updates": args.updates, "threads": args.threads,
            "emulated_rate_mbit": args.emulated_rate_mbit, "extra": args.extra}
    if same != want or set(old.get("raw", {})) != set(labels):
        raise MoEUsageError(f"--out {out} holds another measurement ({same}, configs {sorted(old.get('raw', {}))}); "
                            "give another --out or delete it")
    return old["raw"]


def main(argv=None):
    args = build_parser().parse_args(argv)
    names = config_names(args.configs)
    if args.anchor not in [parse_spec(n)[0] for n in names]:
        raise MoEUsageError(f"--anchor {args.anchor} is not one of --configs")
    if args.updates < LOG_INTERVAL or args.updates % LOG_INTERVAL or args.warmup % LOG_INTERVAL:
        raise MoEUsageError(f"--updates and --warmup must be multiples of {LOG_INTERVAL} (--updates >= {LOG_INTERVAL})")
    specs = {parse_spec(n)[0]: n for n in names}
    settings = [v for n in names for v in variants(n)]
    raw = load_previous(args, [label for label, _ in settings])
    done = min(len(v) for v in raw.values())
    todo = args.rounds - done if args.rounds_now is None else min(args.rounds - done, args.rounds_now)
    start = time.time()
    for r in range(done, done + max(todo, 0)):
        order = settings[r % len(settings):] + settings[:r % len(settings)]
        for label, extra in order:
            if len(raw[label]) > r:
                continue  # measured before an interruption
            spec = specs[label.split("@")[0]]
            ups, wps = measure(args.data, spec, extra + args.extra.split(), args.warmup, args.updates, args.threads,
                               args.emulated_rate_mbit)
            raw[label].append({"round": r, "ups": ups, "wps": wps, "load": os.getloadavg()[0],
                               "time": time.strftime("%Y-%m-%d %H:%M")})
            write(args, names, raw)
            print(f"round {r + 1}/{args.rounds} {label}: {ups:.3f} updates/s, {wps:.0f} words/s "
                  f"({time.time() - start:.0f}s)", flush=True)
    result = write(args, names, raw)
    print("| config | updates/s | words/s | ratio to anchor (paired median) | ratio of medians |")
    print("|---|---|---|---|---|")
    for name, v in result["configs"].items():
        print(f"| {name} | {v['ups']:.3f} | {v['wps']:.0f} | {v['ratio']:.3f} | {v['ratio_of_medians']:.3f} |")
    return result


def write(args, names, raw):
    """--out with every stored measurement and the summary over the complete rounds."""
    rounds = min(len(v) for v in raw.values())
    result = {"anchor": args.anchor, "rounds": rounds, "warmup": args.warmup, "updates": args.updates,
              "threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
              "conditions": args.conditions, "emulated_rate_mbit": args.emulated_rate_mbit, "extra": args.extra,
              "date": time.strftime("%Y-%m-%d %H:%M"),
              "configs": summarize(names, raw, rounds, args.anchor) if rounds else {}, "raw": raw}
    atomic_write_json(args.out, result)
    return result


cli_main = one_line_errors(main)


if __name__ == "__main__":
    cli_main()
