#!/usr/bin/env python
"""Forward + backward time of our MoE layer against fairscale's MOELayer and the dense limit (CPU).

Three implementations per (S, k), with E experts of shape M -> F -> M:

* ours:        moe_fairseq's MoELayer (build_moe_layer), router top2 for k=2 / top1 for k=1,
               dropless by default (every slot is processed; --capacity-factor CF to use capacity).
               Router, balance loss and routing statistics included.
* fairscale:   fairscale.nn.moe.MOELayer + Top2Gate (GShard einsum dispatch with an S x E x C mask,
               C = 2S/E, i.e. capacity factor 1 -- fairscale has no knob).  k=2 only: fairscale has
               no Top1Gate, so its column is null for k=1.  Skipped (null) above
               --fairscale-max-tokens because its dispatch is O(S^2).
* dense limit: one FFN (Linear M->F, ReLU, Linear F->M) on k*S tokens: the expert FLOPs of the
               MoE layer with zero routing/dispatch overhead.

The repeats are interleaved (ours, fairscale, dense, ours, ...) so machine noise hits all three
alike; reported times are medians after warmup.  Peak memory: each implementation runs one
forward + backward (gradients None before, as after fairseq's zero_grad) in a fresh subprocess;
reported is the peak RSS (VmHWM, reset via /proc/self/clear_refs) minus the RSS just before,
minus the size of the parameter gradients the step creates -- i.e. activation and temporary
memory of one step (null where the kernel does not allow the reset).

    python scripts/bench_moe_layer.py --json docs/bench_moe_layer.json
"""
import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import time


def _omp_wait_policy_from_argv():
    """OMP_WAIT_POLICY is read once, when torch loads its OpenMP runtime: set it before import."""
    policy = "passive"
    for i, arg in enumerate(sys.argv):
        if arg == "--omp-wait-policy" and i + 1 < len(sys.argv):
            policy = sys.argv[i + 1]
        elif arg.startswith("--omp-wait-policy="):
            policy = arg.split("=", 1)[1]
    if policy in ("passive", "active"):
        os.environ["OMP_WAIT_POLICY"] = policy.upper()
    return policy


OMP_WAIT_POLICY = _omp_wait_policy_from_argv()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from moe_fairseq.moe import MoEConfig, build_moe_layer  # noqa: E402  (torch only: no fairseq)


# --------------------------------------------------------------------------- implementations

class Ours:
    name = "ours"

    def __init__(self, S, E, M, F, k, capacity_factor):
        router = "top2" if k == 2 else "top1"
        if capacity_factor is None:
            cfg = MoEConfig(num_experts=E, router=router, dropless=True)
        else:
            cfg = MoEConfig(num_experts=E, router=router, capacity_factor=capacity_factor)
        self.module = build_moe_layer(cfg, M, F).train()
        self.x = torch.randn(S, M, requires_grad=True)

    def step(self):
        out = self.module(self.x)
        loss = out.sum() + sum(self.module.aux.losses.values())
        loss.backward()


class Fairscale:
    name = "fairscale"

    def __init__(self, S, E, M, F, k, capacity_factor):
        import torch.distributed as dist
        from fairscale.nn.moe import MOELayer, Top2Gate

        if S % E:
            raise ValueError(f"fairscale needs tokens % experts == 0 (got S={S}, E={E})")
        experts = nn.ModuleList(nn.Sequential(nn.Linear(M, F), nn.ReLU(), nn.Linear(F, M)) for _ in range(E))
        self.module = MOELayer(Top2Gate(M, E), experts, group=dist.group.WORLD).train()
        self.x = torch.randn(S, 1, M, requires_grad=True)  # (s)equence, (t)oken, (m)odel

    def step(self):
        out = self.module(self.x)
        loss = out.sum() + self.module.l_aux
        loss.backward()


class Dense:
    name = "dense"

    def __init__(self, S, E, M, F, k, capacity_factor):
        self.module = nn.Sequential(nn.Linear(M, F), nn.ReLU(), nn.Linear(F, M)).train()
        self.x = torch.randn(k * S, M, requires_grad=True)

    def step(self):
        self.module(self.x).sum().backward()


IMPLS = {"ours": Ours, "fairscale": Fairscale, "dense": Dense}


def zero_grads(impl):
    impl.module.zero_grad(set_to_none=True)
    impl.x.grad = None


def timed_step(impl):
    zero_grads(impl)
    t0 = time.perf_counter()
    impl.step()
    return (time.perf_counter() - t0) * 1000.0


# --------------------------------------------------------------------------- process group

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_group():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


# --------------------------------------------------------------------------- peak memory

def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_worker(impl_name, S, E, M, F, k, threads, capacity_factor):
    """Runs in a subprocess: MB of peak RSS above the pre-step RSS for one forward + backward."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if impl_name == "fairscale":
        init_single_process_group()
    impl = IMPLS[impl_name](S, E, M, F, k, capacity_factor)
    zero_grads(impl)  # .grad = None, as fairseq's zero_grad leaves it
    # The parameter gradients the step allocates are model state (the same for ours and
    # fairscale, E times the dense FFN's): subtracted, so what remains is activation and
    # temporary memory.
    grad_kb = sum(p.numel() * p.element_size() for p in impl.module.parameters()) / 1024.0
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    before = _status_kb("VmRSS")
    impl.step()
    return (_status_kb("VmHWM") - before - grad_kb) / 1024.0


def measure_peak(impl_name, S, E, M, F, k, threads, capacity_factor):
    cmd = [sys.executable, os.path.abspath(__file__), "--_peak-worker", impl_name,
           "--omp-wait-policy", OMP_WAIT_POLICY, "--tokens", str(S),
           "--experts", str(E), "--model-dim", str(M), "--ffn-dim", str(F), "--k", str(k),
           "--threads", str(threads)]
    if capacity_factor is not None:
        cmd += ["--capacity-factor", str(capacity_factor)]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        value = json.loads(out)
    except (subprocess.CalledProcessError, IndexError, ValueError) as e:
        print(f"  peak memory of {impl_name} failed: {e}", file=sys.stderr)
        return None
    return None if value is None else round(value, 1)


# --------------------------------------------------------------------------- main

def run_config(S, E, M, F, k, args):
    torch.manual_seed(0)
    impls = [Ours(S, E, M, F, k, args.capacity_factor)]
    fairscale_ok = (not args.skip_fairscale) and k == 2 and S <= args.fairscale_max_tokens
    if fairscale_ok:
        impls.append(Fairscale(S, E, M, F, k, args.capacity_factor))
    impls.append(Dense(S, E, M, F, k, args.capacity_factor))
    times = {impl.name: [] for impl in impls}
    for _ in range(args.warmup):
        for impl in impls:
            timed_step(impl)
    for _ in range(args.repeats):
        for impl in impls:  # interleaved: noise hits every implementation alike
            times[impl.name].append(timed_step(impl))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    del impls
    gc.collect()

    rec = {
        "tokens": S, "experts": E, "k": k, "model_dim": M, "ffn_dim": F, "threads": args.threads,
        "ours_mode": "dropless" if args.capacity_factor is None else f"capacity_factor={args.capacity_factor}",
        "router_ours": "top2" if k == 2 else "top1",
        "ms_ours": round(med["ours"], 2),
        "ms_fairscale": round(med["fairscale"], 2) if "fairscale" in med else None,
        "ms_dense_limit": round(med["dense"], 2),
        "peak_mb_ours": None, "peak_mb_fairscale": None, "peak_mb_dense_limit": None,
        "repeats": args.repeats, "warmup": args.warmup, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "ms_all": {name: [round(t, 2) for t in ts] for name, ts in times.items()},
    }
    rec["ratio_ours_dense"] = round(med["ours"] / med["dense"], 3)
    # Median over repeats of the ratio within one interleaved round: robust to slow drifts of load.
    rec["ratio_ours_dense_paired_median"] = round(
        statistics.median(o / d for o, d in zip(times["ours"], times["dense"])), 3)
    rec["speedup_vs_fairscale"] = round(med["fairscale"] / med["ours"], 2) if "fairscale" in med else None
    if not args.skip_peak_mem:
        rec["peak_mb_ours"] = measure_peak("ours", S, E, M, F, k, args.threads, args.capacity_factor)
        rec["peak_mb_dense_limit"] = measure_peak("dense", S, E, M, F, k, args.threads, args.capacity_factor)
        if fairscale_ok:
            rec["peak_mb_fairscale"] = measure_peak("fairscale", S, E, M, F, k, args.threads, args.capacity_factor)
    return rec


def fmt(v, spec="{:.1f}"):
    return "null" if v is None else spec.format(v)


def markdown_table(records):
    lines = ["| S | E | k | ours: router, capacity | ours (ms) | fairscale (ms) | dense limit (ms) | ours / dense "
             "| fairscale / ours | fairscale / dense | peak MB ours | peak MB fairscale | peak MB dense |",
             "|---:|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        fs_dense = None if r["ms_fairscale"] is None else r["ms_fairscale"] / r["ms_dense_limit"]
        lines.append(
            f"| {r['tokens']} | {r['experts']} | {r['k']} | {r['router_ours']}, {r['ours_mode']} "
            f"| {r['ms_ours']:.1f} | {fmt(r['ms_fairscale'])} "
            f"| {r['ms_dense_limit']:.1f} | {r['ratio_ours_dense']:.2f}x | {fmt(r['speedup_vs_fairscale'], '{:.2f}x')} "
            f"| {fmt(fs_dense, '{:.2f}x')} | {fmt(r['peak_mb_ours'], '{:.0f}')} "
            f"| {fmt(r['peak_mb_fairscale'], '{:.0f}')} | {fmt(r['peak_mb_dense_limit'], '{:.0f}')} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--model-dim", type=int, default=512)
    p.add_argument("--ffn-dim", type=int, default=2048)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="capacity factor of our router (default: dropless)")
    p.add_argument("--skip-fairscale", action="store_true")
    p.add_argument("--fairscale-max-tokens", type=int, default=8192,
                   help="fairscale's dispatch is O(S^2): null above this many tokens")
    p.add_argument("--skip-peak-mem", action="store_true")
    p.add_argument("--omp-wait-policy", choices=["passive", "active", "inherit"], default="passive",
                   help="OMP_WAIT_POLICY for all three implementations (default passive: on a shared, "
                        "oversubscribed machine spinning OpenMP threads steal the cores of descheduled "
                        "ones, which penalises many small parallel regions; inherit: leave the "
                        "environment as it is)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--_peak-worker", dest="peak_worker", choices=list(IMPLS), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.peak_worker:
        print(json.dumps(peak_worker(args.peak_worker, args.tokens[0], args.experts, args.model_dim,
                                     args.ffn_dim, args.k[0], args.threads, args.capacity_factor)))
        return

    torch.set_num_threads(args.threads)
    if not args.skip_fairscale and 2 in args.k:
        try:
            import fairscale  # noqa: F401
        except ImportError:
            sys.exit("fairscale is not installed: pip install --no-deps fairscale, or pass --skip-fairscale")
        init_single_process_group()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"E={args.experts} M={args.model_dim} F={args.ffn_dim}; ours: "
          f"{'dropless' if args.capacity_factor is None else f'capacity factor {args.capacity_factor}'}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}",
          flush=True)
    records = []
    for k in args.k:
        for S in args.tokens:
            t0 = time.time()
            rec = run_config(S, args.experts, args.model_dim, args.ffn_dim, k, args)
            records.append(rec)
            print(f"S={S} k={k}: ours {rec['ms_ours']:.1f} ms, fairscale {fmt(rec['ms_fairscale'])} ms, "
                  f"dense {rec['ms_dense_limit']:.1f} ms, ours/dense {rec['ratio_ours_dense']:.2f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    print()
    print(markdown_table(records))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
