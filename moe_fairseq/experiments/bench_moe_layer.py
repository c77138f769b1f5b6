"""Forward + backward time of our MoE layer against fairscale's MOELayer and the dense limit.

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

* baseline:    (--baseline DIR) the same MoE layer from another checkout's layer library, e.g.
               /work/main/moe_fairseq/moe: old against new in one run, interleaved.

--decode adds the decoder-step case: --decode-rows rows (a beam of a few sentences) through a
layer in evaluation mode under torch.no_grad, forward only, E from --decode-experts: the absolute
per-call time of ours (and the baseline) beside the dense FFN on the same rows.

The repeats are interleaved (ours, fairscale, dense, ours, ...) so machine noise hits all of them
alike; reported times are medians after warmup, and ratios both as the ratio of the medians and
as the median of the per-round ratios (paired: robust to load that drifts during a run).
--clock cpu times process CPU time instead of wall time (on a shared machine a step's wall time
includes the time it waited for a core; with OMP_WAIT_POLICY=PASSIVE idle OpenMP threads sleep,
so CPU time is the work done).  --device cuda times on the GPU (synchronising around each step).  Peak memory: each implementation runs one
forward + backward (gradients None before, as after fairseq's zero_grad) in a fresh subprocess;
reported is the peak RSS (VmHWM, reset via /proc/self/clear_refs) minus the RSS just before,
minus the size of the parameter gradients the step creates -- i.e. activation and temporary
memory of one step (null where the kernel does not allow the reset).

    python scripts/bench_moe_layer.py --json docs/bench_moe_layer.json
    python -W ignore scripts/bench_moe_layer.py --tokens 128 512 2048 8192 16384 --experts 16 64 \
        --skip-fairscale --skip-peak-mem --decode --baseline /work/main/moe_fairseq/moe --json out.json
"""
import argparse
import gc
import importlib.util
import json
import os
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


# Read from the command line at import, before torch loads: the policy must be in the environment
# before the first torch import of the process (scripts/bench_moe_layer.py and bench_moe_peers.py
# import this module first), and the worker processes it starts inherit it.
OMP_WAIT_POLICY = _omp_wait_policy_from_argv()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from .. import moe as moe_pkg  # noqa: E402  (torch only: no fairseq)
from ..atomic_files import atomic_write_json  # noqa: E402
from .launch import REPO, free_port  # noqa: E402


# --------------------------------------------------------------------------- implementations

def build_ours(pkg, S, E, M, F, k, capacity_factor, gemm, device):
    router = "top2" if k == 2 else "top1"
    if capacity_factor is None:
        cfg = pkg.MoEConfig(num_experts=E, router=router, dropless=True)
    else:
        cfg = pkg.MoEConfig(num_experts=E, router=router, capacity_factor=capacity_factor)
    module = pkg.build_moe_layer(cfg, M, F)
    if gemm is not None:
        if not hasattr(module.experts, "gemm"):
            sys.exit(f"--gemm: the layer library {pkg.__name__} has no GEMM modes")
        module.experts.gemm = gemm
    return module.to(device)


class Ours:
    name = "ours"
    pkg = None  # the layer library (moe_fairseq.moe, or the --baseline one)

    def __init__(self, S, E, M, F, k, capacity_factor, gemm=None, device="cpu", decode=False):
        self.decode = decode
        self.module = build_ours(self.pkg, S, E, M, F, k, capacity_factor, gemm, device)
        self.module.train(not decode)
        self.x = torch.randn(S, M, requires_grad=not decode, device=device)

    def step(self):
        if self.decode:  # a decoder step: evaluation, no autograd, nothing asked of the layer
            with torch.no_grad():
                self.module(self.x)
            return
        out = self.module(self.x)
        loss = out.sum() + sum(self.module.aux.losses.values())
        loss.backward()


class Baseline(Ours):
    name = "baseline"


class Fairscale:
    name = "fairscale"

    def __init__(self, S, E, M, F, k, capacity_factor, gemm=None, device="cpu", decode=False):
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

    def __init__(self, S, E, M, F, k, capacity_factor, gemm=None, device="cpu", decode=False):
        self.decode = decode
        self.module = nn.Sequential(nn.Linear(M, F), nn.ReLU(), nn.Linear(F, M)).to(device).train(not decode)
        self.x = torch.randn(k * S, M, requires_grad=not decode, device=device)

    def step(self):
        if self.decode:
            with torch.no_grad():
                self.module(self.x)
            return
        self.module(self.x).sum().backward()


IMPLS = {"ours": Ours, "baseline": Baseline, "fairscale": Fairscale, "dense": Dense}


def load_layer_library(path):
    """Another checkout's `moe_fairseq/moe` as a separate package (torch only, relative imports)."""
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "__init__.py")):
        sys.exit(f"--baseline: {path} is not a layer library directory (want .../moe_fairseq/moe)")
    name = "baseline_moe"
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def zero_grads(impl):
    if getattr(impl, "decode", False):
        return
    impl.module.zero_grad(set_to_none=True)
    impl.x.grad = None


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def timed_step(impl, clock="wall", device="cpu"):
    zero_grads(impl)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    now = CLOCK[clock]
    t0 = now()
    impl.step()
    sync()
    return (now() - t0) * 1000.0


# --------------------------------------------------------------------------- process group

def init_single_process_group():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


# --------------------------------------------------------------------------- peak memory

def status_kb(field):
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
    Ours.pkg = moe_pkg
    impl = IMPLS[impl_name](S, E, M, F, k, capacity_factor)
    zero_grads(impl)  # .grad = None, as fairseq's zero_grad leaves it
    # The parameter gradients the step allocates are model state (the same for ours and
    # fairscale, E times the dense FFN's): subtracted, so what remains is activation and
    # temporary memory.
    grad_kb = sum(p.numel() * p.element_size() for p in impl.module.parameters()) / 1024.0
    return step_peak_mb(impl, grad_kb)


def step_peak_mb(impl, grad_kb):
    """Peak RSS (MB) of one impl.step() above the RSS before it, minus grad_kb (model state);
    None where /proc/self/clear_refs cannot reset the peak."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    before = status_kb("VmRSS")
    impl.step()
    return (status_kb("VmHWM") - before - grad_kb) / 1024.0


def measure_peak(impl_name, S, E, M, F, k, threads, capacity_factor):
    # the script, not this module's file: a module of the package runs only as part of it
    cmd = [sys.executable, str(REPO / "scripts" / "bench_moe_layer.py"), "--_peak-worker", impl_name,
           "--omp-wait-policy", OMP_WAIT_POLICY, "--tokens", str(S),
           "--experts", str(E), "--model-dim", str(M), "--ffn-dim", str(F), "--k", str(k),
           "--threads", str(threads)]
    if capacity_factor is not None:
        cmd += ["--capacity-factor", str(capacity_factor)]
    return run_peak_worker(cmd, impl_name)


def run_peak_worker(cmd, name):
    """The peak memory (MB) a worker process prints as its last line, or None when it failed."""
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        value = json.loads(out)
    except (subprocess.CalledProcessError, IndexError, ValueError) as e:
        print(f"  peak memory of {name} failed: {e}", file=sys.stderr)
        return None
    return None if value is None else round(value, 1)


# --------------------------------------------------------------------------- main

def paired_median(a, b):
    return statistics.median(x / y for x, y in zip(a, b))


def run_config(S, E, M, F, k, args, decode=False):
    torch.manual_seed(0)
    common = dict(gemm=args.gemm, device=args.device, decode=decode)
    impls = [Ours(S, E, M, F, k, args.capacity_factor, **common)]
    if args.baseline:
        torch.manual_seed(0)
        impls.append(Baseline(S, E, M, F, k, args.capacity_factor, device=args.device, decode=decode))
    fairscale_ok = (not decode and not args.skip_fairscale and k == 2 and S <= args.fairscale_max_tokens
                    and args.device == "cpu")
    if fairscale_ok:
        impls.append(Fairscale(S, E, M, F, k, args.capacity_factor))
    impls.append(Dense(S, E, M, F, k, args.capacity_factor, device=args.device, decode=decode))
    repeats, warmup = (args.decode_repeats, args.warmup) if decode else (args.repeats, args.warmup)
    calls = args.decode_calls if decode else 1  # a decode "repeat" times this many calls: ms per call
    times = {impl.name: [] for impl in impls}

    def measure(impl):
        return sum(timed_step(impl, args.clock, args.device) for _ in range(calls)) / calls

    for _ in range(warmup):
        for impl in impls:
            measure(impl)
    for _ in range(repeats):
        for impl in impls:  # interleaved: noise hits every implementation alike
            times[impl.name].append(measure(impl))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    del impls
    gc.collect()

    rec = {
        "case": "decode" if decode else "train_step",
        "tokens": S, "experts": E, "k": k, "model_dim": M, "ffn_dim": F, "threads": args.threads,
        "device": args.device, "clock": args.clock, "gemm": args.gemm or "auto",
        "ours_mode": "dropless" if args.capacity_factor is None else f"capacity_factor={args.capacity_factor}",
        "router_ours": "top2" if k == 2 else "top1",
        "ms_ours": round(med["ours"], 3),
        "ms_baseline": round(med["baseline"], 3) if "baseline" in med else None,
        "ms_fairscale": round(med["fairscale"], 2) if "fairscale" in med else None,
        "ms_dense_limit": round(med["dense"], 3),
        "peak_mb_ours": None, "peak_mb_fairscale": None, "peak_mb_dense_limit": None,
        "repeats": repeats, "warmup": warmup, "calls_per_repeat": calls,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "ms_all": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
    }
    rec["ratio_ours_dense"] = round(med["ours"] / med["dense"], 3)
    # Median over repeats of the ratio within one interleaved round: robust to slow drifts of load.
    rec["ratio_ours_dense_paired_median"] = round(paired_median(times["ours"], times["dense"]), 3)
    rec["overhead_ms_ours"] = round(med["ours"] - med["dense"], 3)  # beyond the dense FFN, per call
    if "baseline" in med:
        rec["ratio_baseline_dense"] = round(med["baseline"] / med["dense"], 3)
        rec["ratio_ours_baseline"] = round(med["ours"] / med["baseline"], 3)
        rec["ratio_ours_baseline_paired_median"] = round(paired_median(times["ours"], times["baseline"]), 3)
        rec["overhead_ms_baseline"] = round(med["baseline"] - med["dense"], 3)
    rec["speedup_vs_fairscale"] = round(med["fairscale"] / med["ours"], 2) if "fairscale" in med else None
    if not decode and not args.skip_peak_mem and args.device == "cpu":
        rec["peak_mb_ours"] = measure_peak("ours", S, E, M, F, k, args.threads, args.capacity_factor)
        rec["peak_mb_dense_limit"] = measure_peak("dense", S, E, M, F, k, args.threads, args.capacity_factor)
        if fairscale_ok:
            rec["peak_mb_fairscale"] = measure_peak("fairscale", S, E, M, F, k, args.threads, args.capacity_factor)
    return rec


def fmt(v, spec="{:.1f}"):
    return "null" if v is None else spec.format(v)


def markdown_table(records):
    lines = ["| S | E | k | ours: router, capacity | ours (ms) | baseline (ms) | fairscale (ms) | dense limit (ms) "
             "| ours / dense | ours / dense paired | baseline / dense | ours / baseline paired | fairscale / ours "
             "| peak MB ours | peak MB fairscale | peak MB dense |",
             "|---:|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        if r["case"] != "train_step":
            continue
        lines.append(
            f"| {r['tokens']} | {r['experts']} | {r['k']} | {r['router_ours']}, {r['ours_mode']} "
            f"| {r['ms_ours']:.1f} | {fmt(r['ms_baseline'])} | {fmt(r['ms_fairscale'])} "
            f"| {r['ms_dense_limit']:.1f} | {r['ratio_ours_dense']:.2f}x | {r['ratio_ours_dense_paired_median']:.2f}x "
            f"| {fmt(r.get('ratio_baseline_dense'), '{:.2f}x')} "
            f"| {fmt(r.get('ratio_ours_baseline_paired_median'), '{:.2f}x')} "
            f"| {fmt(r['speedup_vs_fairscale'], '{:.2f}x')} | {fmt(r['peak_mb_ours'], '{:.0f}')} "
            f"| {fmt(r['peak_mb_fairscale'], '{:.0f}')} | {fmt(r['peak_mb_dense_limit'], '{:.0f}')} |")
    decode = [r for r in records if r["case"] == "decode"]
    if decode:
        lines += ["", "Decoder step (evaluation, no_grad, forward only), ms per call:", "",
                  "| rows | E | k | ours (ms) | baseline (ms) | dense (ms) | overhead ours (ms) "
                  "| overhead baseline (ms) | ours / baseline paired |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in decode:
            lines.append(
                f"| {r['tokens']} | {r['experts']} | {r['k']} | {r['ms_ours']:.3f} | {fmt(r['ms_baseline'], '{:.3f}')} "
                f"| {r['ms_dense_limit']:.3f} | {r['overhead_ms_ours']:.3f} "
                f"| {fmt(r.get('overhead_ms_baseline'), '{:.3f}')} "
                f"| {fmt(r.get('ratio_ours_baseline_paired_median'), '{:.2f}x')} |")
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192],
                   help="tokens per training step (the issue's full range: 128 512 2048 8192 16384)")
    p.add_argument("--experts", type=int, nargs="+", default=[16], help="E (e.g. 16 64)")
    p.add_argument("--model-dim", type=int, default=512)
    p.add_argument("--ffn-dim", type=int, default=2048)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="capacity factor of our router (default: dropless)")
    p.add_argument("--gemm", choices=["auto", "loop", "bmm", "grouped", "aligned"], default=None,
                   help="our experts' GEMM mode (default: the layer's own choice, auto)")
    p.add_argument("--baseline", metavar="DIR",
                   help="also time the layer library in DIR (another checkout's moe_fairseq/moe), interleaved")
    p.add_argument("--decode", action="store_true", help="also time decoder-step calls (see --decode-rows)")
    p.add_argument("--decode-only", action="store_true", help="only the decoder-step calls")
    p.add_argument("--decode-rows", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--decode-experts", type=int, nargs="+", default=[16])
    p.add_argument("--decode-calls", type=int, default=20, help="calls per timed decode repeat")
    p.add_argument("--decode-repeats", type=int, default=15)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or process CPU time (for a loaded machine; CPU only)")
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
    return p


def set_up(args) -> list:
    """Refuse what cannot run, load --baseline, start fairscale's process group when it is timed;
    the (k, E, S) training cases."""
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no GPU")
    if args.device == "cuda" and args.clock == "cpu":
        sys.exit("--clock cpu times host CPU work only: use --clock wall with --device cuda")
    if args.baseline:
        Baseline.pkg = load_layer_library(args.baseline)

    torch.set_num_threads(args.threads)
    train_cases = [] if args.decode_only else [(k, E, S) for k in args.k for E in args.experts for S in args.tokens]
    if not args.skip_fairscale and args.device == "cpu" and any(k == 2 for k, _, _ in train_cases):
        try:
            import fairscale  # noqa: F401
        except ImportError:
            sys.exit("fairscale is not installed: pip install --no-deps fairscale, or pass --skip-fairscale")
        init_single_process_group()
    return train_cases


def main(argv=None):
    args = build_parser().parse_args(argv)
    Ours.pkg = moe_pkg

    if args.peak_worker:
        print(json.dumps(peak_worker(args.peak_worker, args.tokens[0], args.experts[0], args.model_dim,
                                     args.ffn_dim, args.k[0], args.threads, args.capacity_factor)))
        return
    train_cases = set_up(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, device "
          f"{args.device}, clock {args.clock}; M={args.model_dim} F={args.ffn_dim}; ours: "
          f"{'dropless' if args.capacity_factor is None else f'capacity factor {args.capacity_factor}'}, "
          f"gemm {args.gemm or 'auto'}; baseline: {args.baseline or 'none'}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}",
          flush=True)
    records = []
    for k, E, S in train_cases:
        t0 = time.time()
        rec = run_config(S, E, args.model_dim, args.ffn_dim, k, args)
        records.append(rec)
        print(f"S={S} E={E} k={k}: ours {rec['ms_ours']:.1f} ms, baseline {fmt(rec['ms_baseline'])} ms, "
              f"fairscale {fmt(rec['ms_fairscale'])} ms, dense {rec['ms_dense_limit']:.1f} ms, "
              f"ours/dense {rec['ratio_ours_dense']:.2f} (paired {rec['ratio_ours_dense_paired_median']:.2f}) "
              f"({time.time() - t0:.0f} s)", flush=True)
    if args.decode or args.decode_only:
        for k in args.k:
            for E in args.decode_experts:
                for rows in args.decode_rows:
                    rec = run_config(rows, E, args.model_dim, args.ffn_dim, k, args, decode=True)
                    records.append(rec)
                    print(f"decode rows={rows} E={E} k={k}: ours {rec['ms_ours']:.3f} ms/call, baseline "
                          f"{fmt(rec['ms_baseline'], '{:.3f}')}, dense {rec['ms_dense_limit']:.3f}", flush=True)
    print()
    print(markdown_table(records))
    if args.json:
        atomic_write_json(args.json, records)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


cli_main = main  # its errors are sys.exit messages already (no excepthook needed)


if __name__ == "__main__":
    cli_main()
