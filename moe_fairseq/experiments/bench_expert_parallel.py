"""All-to-all volume and step time of an expert-parallel MoE layer under Gating Dropout.

W gloo processes on CPU (one thread each) run forward + backward of one MoE layer (top-2,
large capacity, E = 2W experts: two per rank) on their own tokens, for gating-dropout rates p
and both modes.  Every configuration runs the same update numbers, so the drop decisions are
nested across p (a step dropped at p = 0.1 is dropped at 0.3 too) and the realised drop
fraction is reported next to p.

Measured per step and rank: bytes passed to all_to_all_single (inputs of every call: the count
exchange, the dispatch and return all-to-alls and their backward; including the split a rank
sends to itself), the part that leaves the rank, and the wall time of forward + backward.
Reported: bytes averaged over steps and ranks; step time = median over steps, max over ranks
(with p < 0.5 most steps are routed, so the median is a routed step: the mean over steps, max
over ranks, and the medians of routed and dropped steps are reported too).

    python scripts/bench_expert_parallel.py --world-sizes 2 4 --json docs/bench_expert_parallel.json
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .launch import free_port
from ..moe import MoEConfig, build_moe_layer
from ..moe.expert_parallel import ExpertParallelComm

MODES = ("gate_drop", "gate_expert_drop")


def worker(rank, world, port, args, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        num_experts = args.experts_per_rank * world
        cfg = MoEConfig(num_experts=num_experts, router="top2", capacity_factor=args.capacity_factor,
                        eval_capacity_factor=args.capacity_factor, seed=1)
        comm = ExpertParallelComm(num_experts)
        torch.manual_seed(0)
        layer = build_moe_layer(cfg, args.model_dim, args.ffn_dim, comm=comm).train()
        g = torch.Generator().manual_seed(100 + rank)
        x0 = torch.randn(args.tokens, args.model_dim, generator=g)
        target = torch.randn(args.tokens, args.model_dim, generator=g)

        def one_step(update):
            layer.set_num_updates(update)
            x = x0.clone().requires_grad_(True)
            dist.barrier()  # start together; the barrier is not timed
            calls, sent, remote = comm.all_to_all_calls, comm.stats.bytes_sent, comm.stats.remote_bytes_sent
            t0 = time.perf_counter()
            out = x + layer(x)  # the residual carries the token on gate_expert_drop steps
            loss = (out * target).sum() + sum(layer.aux.losses.values())
            loss.backward()
            ms = 1000 * (time.perf_counter() - t0)
            layer.zero_grad(set_to_none=True)
            return dict(ms=ms, bytes=comm.stats.bytes_sent - sent, remote_bytes=comm.stats.remote_bytes_sent - remote,
                        calls=comm.all_to_all_calls - calls, dropped=bool(layer.aux.stats.gating_dropped.item()))

        layer.gating_dropout = 0.0
        for i in range(args.warmup):
            one_step(i)
        results = []
        for mode in MODES:
            for p in args.rates:
                layer.gating_dropout, layer.gating_dropout_mode = p, mode
                steps = [one_step(args.first_update + i) for i in range(args.steps)]
                results.append(dict(mode=mode, p=p, rank=rank, steps=steps))
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump([r for per_rank in gathered for r in per_rank], f)
    finally:
        dist.destroy_process_group()


def _median_of_kind(runs, dropped):
    """Median over the routed (or dropped) steps of each rank, max over ranks; None if none."""
    per_rank = [[s["ms"] for s in r["steps"] if s["dropped"] == dropped] for r in runs]
    return max(statistics.median(v) for v in per_rank) if per_rank[0] else None


def summarize(world, raw, args):
    records = []
    for mode in MODES:
        for p in args.rates:
            runs = [r for r in raw if r["mode"] == mode and r["p"] == p]
            dropped = [s["dropped"] for s in runs[0]["steps"]]
            assert all([s["dropped"] for s in r["steps"]] == dropped for r in runs), "ranks disagree on drops"
            records.append(dict(
                world_size=world, mode=mode, p=p, experts=args.experts_per_rank * world,
                tokens_per_rank=args.tokens, model_dim=args.model_dim, ffn_dim=args.ffn_dim, steps=args.steps,
                drop_fraction=sum(dropped) / len(dropped),
                a2a_bytes_per_step=statistics.mean(s["bytes"] for r in runs for s in r["steps"]),
                a2a_remote_bytes_per_step=statistics.mean(s["remote_bytes"] for r in runs for s in r["steps"]),
                a2a_calls_per_step=statistics.mean(s["calls"] for r in runs for s in r["steps"]),
                step_ms=max(statistics.median(s["ms"] for s in r["steps"]) for r in runs),
                step_ms_mean=max(statistics.mean(s["ms"] for s in r["steps"]) for r in runs),
                routed_step_ms=_median_of_kind(runs, False),
                dropped_step_ms=_median_of_kind(runs, True),
            ))
    for rec in records:
        base = next(r for r in records if r["mode"] == rec["mode"] and r["p"] == 0.0) if 0.0 in args.rates else None
        if base:
            rec["bytes_ratio_vs_p0"] = rec["a2a_bytes_per_step"] / base["a2a_bytes_per_step"]
            rec["time_ratio_vs_p0"] = rec["step_ms"] / base["step_ms"]
            rec["mean_time_ratio_vs_p0"] = rec["step_ms_mean"] / base["step_ms_mean"]
    return records


def _ms(v):
    return "-" if v is None else f"{v:.0f}"


def markdown(records):
    nan = float("nan")
    lines = ["| W | mode | p | realised drop frac. | a2a MiB/step/rank | of which remote | bytes vs p=0 "
             "| 1 - drop frac. | step ms median | time vs p=0 (median) | step ms mean | time vs p=0 (mean) "
             "| routed step ms | dropped step ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['world_size']} | {r['mode']} | {r['p']:.1f} | {r['drop_fraction']:.3f} "
                     f"| {r['a2a_bytes_per_step'] / 2**20:.2f} | {r['a2a_remote_bytes_per_step'] / 2**20:.2f} "
                     f"| {r.get('bytes_ratio_vs_p0', nan):.3f} | {1 - r['drop_fraction']:.3f} "
                     f"| {r['step_ms']:.0f} | {r.get('time_ratio_vs_p0', nan):.2f} "
                     f"| {r['step_ms_mean']:.0f} | {r.get('mean_time_ratio_vs_p0', nan):.2f} "
                     f"| {_ms(r['routed_step_ms'])} | {_ms(r['dropped_step_ms'])} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--first-update", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    ap.add_argument("--model-dim", type=int, default=512)
    ap.add_argument("--ffn-dim", type=int, default=1024)
    ap.add_argument("--experts-per-rank", type=int, default=2)
    ap.add_argument("--capacity-factor", type=float, default=2.0)
    ap.add_argument("--json", help="write the records here")
    args = ap.parse_args(argv)
    records = []
    for world in args.world_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "raw.json")
            t0 = time.time()
            mp.spawn(worker, args=(world, free_port(), args, out), nprocs=world, join=True)
            with open(out) as f:
                recs = summarize(world, json.load(f), args)
        print(f"W={world}: {time.time() - t0:.0f} s", file=sys.stderr)
        records.extend(recs)
    print(markdown(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


cli_main = main  # as the command has always run: argparse's errors, no excepthook


if __name__ == "__main__":
    cli_main()
