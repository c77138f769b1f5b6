"""Gating Dropout on the emulated two-node cluster: all-to-all share of a step and steps/s at
several link rates, measured beside the cost model's prediction.

    python scripts/calibrate_network.py --data data-bin/multi30k --train-rates 0 800 120 \\
        --layer-rates 0 2500 700 --work-dir calib/ --json docs/emulated_network.json

Two levels, each with one rank per emulated node (gloo over TCP between the namespaces, one
intra-op thread per rank, scripts/emulated_cluster.py):

  layer  one MoE layer of configs/multi30k/moe_top2.args (its model dim, expert FFN dim,
         8 experts, top-2, dropless), expert parallel (4 experts per node), --max-tokens rows
         per rank, forward + backward;
  train  fairseq-train updates of that config through scripts/train_torchrun.sh (the
         launcher's NNODES / NODE_RANK / MASTER_ADDR come from the harness), with
         scripts/timed_fairseq_train.py timing each update.

Within one run the 12 settings (gate_drop, gate_expert_drop and local_topk at p = 0, 0.1, 0.3,
0.5; step_timing.SETTINGS) take turns in blocks of updates (step_timing.setting_for_update), so they share the machine's load;
every timed fairseq-train update trains on the same batch (timed_fairseq_train.py).  Runs are
repeated in --rounds, the rates in a different order each round; medians over rounds are
reported.  The all-to-all share is the time spent inside all_to_all_single (count
exchange included) over the step time, at p = 0.  Steps/s = 1 / mean step time of a setting.
The prediction is cost_model.speedup_from_share at the measured share and the realised fraction
of dropped layer-steps.  Its one parameter that is not a network quantity, the share of the
remaining (compute) time that dropping a layer-step scales (experts, router, dispatch), is fitted
by least squares on the unshaped link's points of that level (fit_expert_share) and then used at
the shaped rates; the prediction with no compute saving at all (expert share 0: the network
term alone) is reported too.

Resumable: each (level, rate, round) run leaves WORK_DIR/<level>-<rate>mbit-round<r>/done, and
finished runs are skipped; --summarize-only rebuilds the JSON from what is there.
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time

from ..atomic_files import atomic_write_text
from . import cost_model, emulated_cluster, step_timing
from .launch import REPO as CHECKOUT

REPO = str(CHECKOUT)
SCRIPTS = str(CHECKOUT / "scripts")

CONFIG = os.path.join(REPO, "configs", "multi30k", "moe_top2.args")
LEVELS = ("layer", "train")


# ---------------------------------------------------------------- the layer level (node program)
def layer_dims(config: str):
    """(MoEConfig, model dim, expert FFN dim, tokens per rank) of a config file's MoE layers."""
    from ..models.moe_args import add_moe_args, moe_config_from_args, set_moe_defaults

    with open(config) as f:
        tokens = [t for line in f if not line.startswith("#") for t in line.split()]
    parser = argparse.ArgumentParser(add_help=False)
    add_moe_args(parser)
    parser.add_argument("--encoder-embed-dim", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    args, _ = parser.parse_known_args(tokens)
    set_moe_defaults(args)
    ffn = args.moe_expert_ffn_dim
    if not ffn:
        raise SystemExit(f"calibrate_network: {config} sets no --moe-expert-ffn-dim")
    return moe_config_from_args(args), args.encoder_embed_dim, ffn, args.max_tokens


def node_layer(argv) -> None:
    """One rank of the layer level, inside an emulated node (NODE_RANK, NNODES, MASTER_ADDR)."""
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--out", required=True, help="JSON lines, {rank} replaced")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--block", type=int, default=2)
    p.add_argument("--cycles", type=int, default=3)
    a = p.parse_args(argv)
    import torch
    import torch.distributed as dist

    from ..moe import build_moe_layer
    from ..moe.expert_parallel import ExpertParallelComm

    torch.set_num_threads(1)
    rank, world = int(os.environ["NODE_RANK"]), int(os.environ["NNODES"])
    dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                            rank=rank, world_size=world)
    cfg, model_dim, ffn_dim, tokens = layer_dims(a.config)
    timer = step_timing.CollectiveTimer().install()
    torch.manual_seed(0)
    layer = build_moe_layer(cfg, model_dim, ffn_dim, comm=ExpertParallelComm(cfg.num_experts)).train()
    g = torch.Generator().manual_seed(100 + rank)
    x0, target = torch.randn(tokens, model_dim, generator=g), torch.randn(tokens, model_dim, generator=g)
    total = a.warmup + a.block * len(step_timing.SETTINGS) * a.cycles
    with open(a.out.replace("{rank}", str(rank)), "a") as out:
        for update in range(total):
            mode, rate = step_timing.setting_for_update(update, a.warmup, a.block)
            step_timing.set_gating_dropout([layer], mode, rate)
            layer.set_num_updates(update)
            x = x0.clone().requires_grad_(True)
            dist.barrier()  # start together, as after a synchronous optimizer step; not timed
            calls, nbytes, seconds = timer.snapshot()
            t0 = time.perf_counter()
            y = x + layer(x)
            ((y * target).sum() + sum(layer.aux.losses.values())).backward()
            elapsed = time.perf_counter() - t0
            layer.zero_grad(set_to_none=True)
            out.write(json.dumps({"rank": rank, "update": update, "mode": mode, "p": rate,
                                  "warmup": update < a.warmup, "seconds": elapsed,
                                  "a2a_seconds": timer.seconds - seconds, "a2a_calls": timer.calls - calls,
                                  "a2a_bytes": timer.bytes - nbytes,
                                  "dropped_layers": step_timing.dropped_layers([layer], update),
                                  "moe_layers": 1, "tokens": tokens}) + "\n")
            out.flush()
    # Both ranks finish before either tears down: rank 0 hosts the TCP store, and a rank still
    # talking to it when rank 0 exits aborts ("terminate called without an active exception",
    # status 134; about one run in five here), as tests/ep_worker.py's run_jobs explains.
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- the driver
def run_dir(work_dir, level, rate, rnd):
    return os.path.join(work_dir, f"{level}-{rate:g}mbit-round{rnd}")


def node_command(level, out_dir, a):
    py = sys.executable
    if level == "layer":
        # the script, not this module's file: a module of the package runs only as part of it
        return [py, "-W", "ignore", os.path.join(SCRIPTS, "calibrate_network.py"), "node-layer", "--config", a.config,
                "--out", os.path.join(out_dir, "rank{rank}.jsonl"), "--cycles", str(a.layer_cycles),
                "--block", str(a.block)]
    updates = a.warmup + a.block * len(step_timing.SETTINGS) * a.train_cycles
    train = [os.path.join(SCRIPTS, "train_torchrun.sh"), a.config, a.data, os.path.join(out_dir, "save$NODE_RANK"),
             "--max-update", str(updates), "--disable-validation", "--no-save", "--num-workers", "0",
             "--log-format", "simple", "--log-interval", "1", "--no-progress-bar", *a.train_args]
    return ["bash", "-c", " ".join(shlex.quote(t) if "$" not in t else t for t in train)]


def node_env(level, out_dir, a):
    bindir = os.path.dirname(sys.executable)
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if level == "train":
        env.update(CPU="1", NPROC="1", TORCHRUN=os.path.join(bindir, "torchrun"),
                   FAIRSEQ_TRAIN=os.path.join(SCRIPTS, "timed_fairseq_train.py"),
                   STEP_TIMING_OUT=os.path.join(out_dir, "rank{rank}.jsonl"),
                   STEP_TIMING_WARMUP=str(a.warmup), STEP_TIMING_BLOCK=str(a.block), STEP_TIMING_FIXED_BATCH="1",
                   PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    return env


def level_rates(a, level):
    return a.layer_rates if level == "layer" else a.train_rates


def measure(a) -> None:
    for rnd in range(a.rounds):
        for level in a.levels:
            rates = level_rates(a, level)
            for rate in rates[rnd % len(rates):] + rates[:rnd % len(rates)]:  # a different order each round
                d = run_dir(a.work_dir, level, rate, rnd)
                if os.path.exists(os.path.join(d, "done")):
                    continue
                shutil.rmtree(d, ignore_errors=True)  # a half-finished run starts over
                os.makedirs(d)
                load = os.getloadavg()
                t0 = time.time()
                print(f"calibrate_network: {level} at {rate:g} Mbit/s, round {rnd}", file=sys.stderr, flush=True)
                status = emulated_cluster.run_cluster(node_command(level, d, a), nodes=2, rate_mbit=rate,
                                                      log_dir=os.path.join(d, "logs"), env=node_env(level, d, a),
                                                      quiet=True, timeout=a.timeout)
                if status != 0:
                    raise SystemExit(f"calibrate_network: the {level} run at {rate:g} Mbit/s failed "
                                     f"(status {status}); see {d}/logs")
                meta = {"level": level, "rate_mbit": rate, "round": rnd, "seconds": time.time() - t0,
                        "load_before": load, "load_after": os.getloadavg()}
                atomic_write_text(os.path.join(d, "done"), json.dumps(meta) + "\n")


def _records(d):
    out = []
    for rank in (0, 1):
        with open(os.path.join(d, f"rank{rank}.jsonl")) as f:
            out += [json.loads(line) for line in f if line.strip()]
    return [r for r in out if not r["warmup"]]


def run_steps(d):
    """The timed updates of a run: per update its setting, the step time (max over ranks), the
    all-to-all seconds and bytes (mean over ranks) and the fraction of MoE layers dropped."""
    by_update = {}
    for r in _records(d):
        by_update.setdefault(r["update"], []).append(r)
    return [{"mode": rs[0]["mode"], "p": rs[0]["p"], "seconds": max(r["seconds"] for r in rs),
             "a2a_seconds": statistics.mean(r["a2a_seconds"] for r in rs),
             "a2a_bytes": statistics.mean(r["a2a_bytes"] for r in rs),
             "dropped": rs[0]["dropped_layers"] / rs[0]["moe_layers"]} for _, rs in sorted(by_update.items())]


def summarize_run(d):
    """One run: the all-to-all share of a routed step; per mode, the least-squares line
    step seconds = routed + slope x (fraction of layers dropped) over all its updates (every p),
    and per setting the direct mean step time and realised drop fraction.

    The line pools every update of a mode: the expected step time at rate p is routed + slope p,
    a far steadier estimate on a loaded machine than the mean of the few updates run at p.
    slope_se is the slope's standard error (from the residuals; nan with fewer than 3 updates)."""
    steps = run_steps(d)
    routed = [s for s in steps if s["dropped"] == 0]
    out = {"a2a_share": statistics.mean(s["a2a_seconds"] for s in routed) / statistics.mean(s["seconds"] for s in routed),
           "a2a_seconds_routed": statistics.mean(s["a2a_seconds"] for s in routed), "modes": {}}
    for mode in step_timing.MODES:
        ms = [s for s in steps if s["mode"] == mode]
        xbar, ybar = statistics.mean(s["dropped"] for s in ms), statistics.mean(s["seconds"] for s in ms)
        var = sum((s["dropped"] - xbar) ** 2 for s in ms)
        slope = sum((s["dropped"] - xbar) * (s["seconds"] - ybar) for s in ms) / var if var else 0.0
        residual = sum((s["seconds"] - ybar - slope * (s["dropped"] - xbar)) ** 2 for s in ms)
        slope_se = (residual / (len(ms) - 2) / var) ** 0.5 if var and len(ms) > 2 else float("nan")
        per_p = {}
        for p in step_timing.RATES:
            ps = [s for s in ms if s["p"] == p]
            per_p[p] = {"direct_seconds": statistics.mean(s["seconds"] for s in ps),
                        "drop_fraction": statistics.mean(s["dropped"] for s in ps),
                        "a2a_mib": statistics.mean(s["a2a_bytes"] for s in ps) / 2**20}
        out["modes"][mode] = {"routed_seconds": ybar - slope * xbar, "slope": slope, "slope_se": slope_se,
                              "per_p": per_p}
    return out


def fit_expert_share(entry) -> float:
    """Least-squares share e of the compute time that dropping scales, from one link's measured
    (pooled) speedups at p > 0, every mode: 1 / speedup = (1 - s)(1 - e (1 - scale(p))) + s (1 - p)
    at the share s (cost_model.speedup_from_share), linear in e.  local_topk scales no compute
    (scale = 1), so its points add nothing to the fit."""
    s, xy, xx = entry["a2a_share"], 0.0, 0.0
    for mode in step_timing.MODES:
        for p in step_timing.RATES[1:]:
            d, m = p, entry["measured_speedup"][mode][str(p)]
            x = (1 - s) * (1 - cost_model.expert_compute_scale(d, mode, 2))
            xy += x * ((1 - s) + s * (1 - d) - 1 / m)
            xx += x * x
    return min(1.0, max(0.0, xy / xx)) if xx else 0.0


def _done_runs(a, level, rate):
    dirs = [run_dir(a.work_dir, level, rate, rnd) for rnd in range(a.rounds)]
    return [d for d in dirs if os.path.exists(os.path.join(d, "done"))]


def measured_link(a, level, rate):
    """One link rate's measurements (medians over rounds), or None if no run is done."""
    dirs = _done_runs(a, level, rate)
    if not dirs:
        return None
    rounds = [summarize_run(d) for d in dirs]
    metas = []
    for d in dirs:
        with open(os.path.join(d, "done")) as f:
            metas.append(json.load(f))
    entry = {"rate_mbit": rate, "a2a_share": round(statistics.median(r["a2a_share"] for r in rounds), 4),
             "a2a_seconds_per_routed_step": round(statistics.median(r["a2a_seconds_routed"] for r in rounds), 4),
             "rounds": len(rounds), "load_before": [m["load_before"][0] for m in metas],
             "load_after": [m["load_after"][0] for m in metas]}
    keys = ("steps_per_s", "measured_speedup", "measured_speedup_ci95", "steps_per_s_direct",
            "measured_speedup_direct", "drop_fraction", "a2a_mib_per_step")
    for key in keys:
        entry[key] = {mode: {} for mode in step_timing.MODES}
    for mode, p in step_timing.SETTINGS:
        k = str(p)
        fits = [r["modes"][mode] for r in rounds]
        expected = [f["routed_seconds"] + f["slope"] * p for f in fits]
        direct = [f["per_p"][p]["direct_seconds"] for f in fits]
        entry["steps_per_s"][mode][k] = round(statistics.median(1 / t for t in expected), 4)
        entry["measured_speedup"][mode][k] = round(statistics.median(
            f["routed_seconds"] / t for f, t in zip(fits, expected)), 4)
        # 95% interval of one round's pooled speedup from the slope's standard error alone (the
        # routed time's error is much smaller: every update informs it); with several rounds, the
        # median round's interval
        mid = sorted(fits, key=lambda f: f["routed_seconds"] / (f["routed_seconds"] + f["slope"] * p))[len(fits) // 2]
        entry["measured_speedup_ci95"][mode][k] = [round(mid["routed_seconds"] / (
            mid["routed_seconds"] + (mid["slope"] + sign * 1.96 * mid["slope_se"]) * p), 4) for sign in (1, -1)]
        entry["steps_per_s_direct"][mode][k] = round(statistics.median(1 / t for t in direct), 4)
        entry["measured_speedup_direct"][mode][k] = round(statistics.median(
            f["per_p"][0.0]["direct_seconds"] / t for f, t in zip(fits, direct)), 4)
        entry["drop_fraction"][mode][k] = round(statistics.mean(f["per_p"][p]["drop_fraction"] for f in fits), 4)
        entry["a2a_mib_per_step"][mode][k] = round(statistics.mean(f["per_p"][p]["a2a_mib"] for f in fits), 2)
    return entry


def add_predictions(entry, expert_share) -> None:
    """The cost model at the link's measured share: at p (beside the pooled measurement), at
    the realised drop fraction (beside the direct one), and with no compute saving at all."""
    for key in ("predicted_speedup", "predicted_speedup_at_realised_drop", "predicted_speedup_network_only"):
        entry[key] = {mode: {} for mode in step_timing.MODES}
    s = entry["a2a_share"]
    for mode, p in step_timing.SETTINGS:
        k, d = str(p), entry["drop_fraction"][mode][str(p)]
        entry["predicted_speedup"][mode][k] = round(cost_model.speedup_from_share(s, p, mode, 2, expert_share), 4)
        entry["predicted_speedup_at_realised_drop"][mode][k] = round(
            cost_model.speedup_from_share(s, d, mode, 2, expert_share), 4)
        entry["predicted_speedup_network_only"][mode][k] = round(cost_model.speedup_from_share(s, p, mode, 2, 0.0), 4)


def summarize(a):
    """{level: {"links": [...], "expert_share": fitted e}}: unshaped link first, then falling rate."""
    levels = {}
    for level in a.levels:
        links = [e for e in (measured_link(a, level, r) for r in sorted(level_rates(a, level),
                                                                        key=lambda r: (r != 0, -r))) if e]
        unshaped = [e for e in links if e["rate_mbit"] == 0]
        share = fit_expert_share(unshaped[0]) if unshaped else 0.0
        for e in links:
            add_predictions(e, share)
        levels[level] = {"links": links, "expert_share": round(share, 4)}
    return levels


def markdown(links):
    lines = ["| rate Mbit/s | a2a share | mode | p | steps/s | measured speedup (95% interval) | predicted | error "
             "| direct steps/s (realised drop) | direct speedup | predicted at realised drop |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in links:
        rate = "unshaped" if e["rate_mbit"] == 0 else f"{e['rate_mbit']:g}"
        for mode, p in step_timing.SETTINGS:
            k = str(p)
            m, pr = e["measured_speedup"][mode][k], e["predicted_speedup"][mode][k]
            lo, hi = e["measured_speedup_ci95"][mode][k]
            lines.append(f"| {rate} | {e['a2a_share']:.1%} | {mode} | {p} | {e['steps_per_s'][mode][k]:.3f} "
                         f"| {m:.3f}x ({lo:.2f}-{hi:.2f}) | {pr:.3f}x | {(pr - m) / m:+.1%} "
                         f"| {e['steps_per_s_direct'][mode][k]:.3f} ({e['drop_fraction'][mode][k]:.2f}) "
                         f"| {e['measured_speedup_direct'][mode][k]:.3f}x "
                         f"| {e['predicted_speedup_at_realised_drop'][mode][k]:.3f}x |")
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="fairseq data-bin of the config (train level)")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--layer-rates", type=float, nargs="+", default=[0.0, 2500.0, 700.0],
                   help="layer level: link rates, Mbit/s (0: unshaped, needed for the fit)")
    p.add_argument("--train-rates", type=float, nargs="+", default=[0.0, 800.0, 120.0],
                   help="train level: link rates, Mbit/s (0: unshaped, needed for the fit)")
    p.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--block", type=int, default=2, help="consecutive updates per setting")
    p.add_argument("--warmup", type=int, default=3, help="train level: p = 0 updates before timing")
    p.add_argument("--layer-cycles", type=int, default=4, help="layer level: cycles over the 12 settings per run")
    p.add_argument("--train-cycles", type=int, default=2, help="train level: cycles over the 12 settings per run")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[], help="more fairseq-train flags (last)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--work-dir", required=True)
    p.add_argument("--json", help="write {links, layer_links, ...} here")
    p.add_argument("--summarize-only", action="store_true")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["node-layer"]:
        return node_layer(argv[1:])
    a = build_parser().parse_args(argv)
    if "train" in a.levels and not a.summarize_only:
        if not a.data or not os.path.exists(os.path.join(a.data, "dict.txt")):
            raise SystemExit(f"calibrate_network: --data must be a fairseq data-bin with dict.txt (got {a.data})")
    problem = emulated_cluster.missing_requirements()
    if problem and not a.summarize_only:
        raise SystemExit(problem)
    if not a.summarize_only:
        measure(a)
    levels = summarize(a)
    for level, result in levels.items():
        print(f"\n{level} level (fitted compute share scaled by dropping: {result['expert_share']:.3f})\n"
              + markdown(result["links"]))
    if a.json:
        doc = {"links": levels.get("train", {}).get("links", []),
               "layer_links": levels.get("layer", {}).get("links", []),
               "expert_share": {level: r["expert_share"] for level, r in levels.items()},
               "command": "python scripts/calibrate_network.py " + " ".join(shlex.quote(t) for t in argv)}
        atomic_write_text(a.json, json.dumps(doc, indent=1) + "\n")


cli_main = main  # its errors are SystemExit messages already


if __name__ == "__main__":
    cli_main()
