"""Forward + backward of our MoE layer against DeepSpeed-MoE and torchtitan's MoE, side by side,
and against its own floor (its expert GEMMs alone).

Every implementation gets the same E experts of M -> F -> M, the same k (2), the same S input
tokens and the same number of threads; each is set up as its own documentation recommends:

* ours:        moe_fairseq's MoELayer, router top2 (GShard: softmax, first expert, Gumbel-sampled
               second expert), balance loss and routing statistics included, fp32.  Three set-ups:
               dropless (the project's recipe), capacity factor 1.0 (what DeepSpeed gets), and
               dropless under torch.autocast(bf16) (the precision torchtitan computes in).
* floor:       our layer's experts alone (FFNExperts forward + backward) on rows already grouped by
               expert, with the counts of one routed step of the dropless layer: the same per-expert
               GEMMs with no routing, dispatch or combine.  1 - floor / ours is the share of a step
               that is not expert work.
* deepspeed:   deepspeed.moe.layer.MoE(M, expert=Sequential(Linear, ReLU, Linear), num_experts=E,
               k=2) with its defaults: capacity factor 1.0 (C = 2 ceil(S/E)), drop_tokens=True,
               min_capacity 4, Gumbel-sampled second expert; every expert processes its C slots,
               empty slots as zero rows (padding to capacity); fp32.  Paired with ours at
               capacity factor 1.0 (the same C and the same first-choices-first priority).
* torchtitan:  torchtitan.models.common.moe.MoE (torchtitan's own MoE layer, as its Qwen3 MoE
               models configure it: softmax scores, route_norm, no shared expert, aux-loss-free
               load balancing, local token dispatcher): dropless, argsort dispatch, experts as
               torch._grouped_mm, which it always runs in bf16, and SwiGLU experts (three M x F
               matrices, 1.5x the FLOPs of a ReLU FFN of the same F, no biases).  Paired with ours
               dropless in bf16 (same precision) and in fp32.

The repeats are interleaved (each round runs every implementation once) and a ratio is the median
over rounds of the per-round ratio (paired: robust to load that drifts).  Peak memory is measured
as in bench_moe_layer.py: one forward + backward in a fresh process, peak RSS above the RSS before
the step, minus the parameter gradients the step creates.

    python -W ignore scripts/bench_moe_peers.py --threads 1 --json docs/bench_moe_layer_peers.json

The peers are optional (pip install -e ".[bench-peers]" in an environment of its own: they may
want another torch); an implementation whose package is missing is left out with a note.
"""
import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import time

# The layer benchmark's timing, memory and process-group helpers; importing it first also sets
# OMP_WAIT_POLICY from --omp-wait-policy before torch loads, which must precede every torch import.
from . import bench_moe_layer as base

torch = base.torch
nn = base.nn
moe_pkg = base.moe_pkg
from ..moe.dispatch import dispatch, plan_dispatch  # noqa: E402
from .launch import REPO  # noqa: E402

ROW_KEYS = ("peer", "tokens", "experts", "k", "ms_peer", "ms_ours", "paired_ratio")
DEFAULT_CASES = ["16:512,2048,8192,16384", "64:512,4096,16384"]


# --------------------------------------------------------------------------- pure functions

def paired_ratio(ms_peer, ms_ours):
    """Median over interleaved rounds of ms_peer / ms_ours within the round."""
    if len(ms_peer) != len(ms_ours) or not ms_peer:
        raise ValueError(f"paired_ratio needs as many peer as ours times, at least one "
                         f"(got {len(ms_peer)} and {len(ms_ours)})")
    return statistics.median(p / o for p, o in zip(ms_peer, ms_ours))


def make_row(peer, tokens, experts, k, ms_peer, ms_ours, **extra):
    """One row of docs/bench_moe_layer_peers.json from the per-round times of a pair."""
    row = {"peer": peer, "tokens": tokens, "experts": experts, "k": k,
           "ms_peer": round(statistics.median(ms_peer), 2), "ms_ours": round(statistics.median(ms_ours), 2),
           "paired_ratio": round(paired_ratio(ms_peer, ms_ours), 3)}
    row.update(extra)
    return row


def check_rows(rows):
    """Raise ValueError unless rows is a list of dicts with every key of ROW_KEYS, typed."""
    if not isinstance(rows, list):
        raise ValueError(f"peer rows must be a list (got {type(rows).__name__})")
    types = {"peer": str, "tokens": int, "experts": int, "k": int, "ms_peer": (int, float),
             "ms_ours": (int, float), "paired_ratio": (int, float)}
    for i, row in enumerate(rows):
        missing = [key for key in ROW_KEYS if key not in row]
        if missing:
            raise ValueError(f"peer row {i} lacks {', '.join(missing)}")
        for key, want in types.items():
            if isinstance(row[key], bool) or not isinstance(row[key], want):
                raise ValueError(f"peer row {i}: {key} must be {getattr(want, '__name__', 'a number')} "
                                 f"(got {row[key]!r})")
    return rows


def parse_case(text):
    """'E:S,S,...' -> (E, [S, ...])."""
    try:
        experts, tokens = text.split(":")
        return int(experts), [int(s) for s in tokens.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--case wants E:S,S,... e.g. 16:512,2048 (got {text!r})") from None


# --------------------------------------------------------------------------- implementations

class OursImpl:
    """Our layer; capacity_factor None = dropless; bf16 = under torch.autocast(cpu, bf16)."""

    def __init__(self, name, S, E, M, F, k, capacity_factor=None, bf16=False, gemm=None):
        self.name, self.bf16 = name, bf16
        self.module = base.build_ours(moe_pkg, S, E, M, F, k, capacity_factor, gemm, "cpu").train()
        self.x = torch.randn(S, M, requires_grad=True)

    def step(self):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.module(self.x)
        (out.sum() + sum(self.module.aux.losses.values())).backward()


def routed_rows(layer, x):
    """The rows and counts one routed step of `layer` hands its experts: (rows grouped by
    expert, per-expert counts).  Read off the layer's own plan, so the floor does the GEMMs
    the layer did."""
    with torch.no_grad():
        routing = layer.router(x)
        plan = plan_dispatch(routing.expert_index, routing.keep, routing.gate, layer.router.num_experts)
        return dispatch(x, plan), list(plan.counts_list)


class FloorImpl:
    """Our experts alone on pre-grouped rows: the layer's expert GEMMs without routing or dispatch."""

    name = "floor"

    def __init__(self, ours):
        self.module = ours.module.experts
        rows, self.counts = routed_rows(ours.module, ours.x.detach())
        self.x = rows.clone().requires_grad_(True)

    def step(self):
        self.module(self.x, self.counts).sum().backward()


class DeepSpeedImpl:
    name = "deepspeed"

    def __init__(self, S, E, M, F, k):
        from deepspeed.moe.layer import MoE

        init_deepspeed()
        expert = nn.Sequential(nn.Linear(M, F), nn.ReLU(), nn.Linear(F, M))
        self.module = MoE(M, expert, num_experts=E, k=k).train()
        self.module.set_deepspeed_parallelism()
        self.x = torch.randn(S, M, requires_grad=True)

    def step(self):
        out, l_aux, _ = self.module(self.x.view(1, *self.x.shape))
        (out.sum() + l_aux).backward()


class TorchtitanImpl:
    name = "torchtitan"

    def __init__(self, S, E, M, F, k):
        from torchtitan.models.common.linear import Linear
        from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
        from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

        router = TokenChoiceTopKRouter.Config(
            num_experts=E, gate=Linear.Config(in_features=M, out_features=E, bias=False), top_k=k,
            score_func="softmax", route_norm=True)
        routed = RoutedExperts.Config(inner_experts=GroupedExperts.Config(dim=M, hidden_dim=F, num_experts=E),
                                      token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=k))
        self.module = MoE.Config(num_experts=E, router=router, routed_experts=routed).build().train()
        with torch.no_grad():  # torchtitan's init for these weights: normal, std 0.02
            for p in self.module.parameters():
                p.normal_(0.0, 0.02)
        self.x = torch.randn(S, M, requires_grad=True)

    def step(self):
        self.module(self.x.view(1, *self.x.shape)).sum().backward()


_DEEPSPEED_READY = []


def init_deepspeed():
    """A one-process gloo group for DeepSpeed's expert-parallel groups (ep_size 1)."""
    if _DEEPSPEED_READY:
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, rank=0, world_size=1,
                               init_method=f"tcp://127.0.0.1:{base.free_port()}")
    _DEEPSPEED_READY.append(True)


def peers_available():
    """{peer: None if importable, else the reason it is left out}."""
    out = {}
    for peer, module in (("deepspeed", "deepspeed.moe.layer"), ("torchtitan", "torchtitan.models.common.moe")):
        try:
            importlib.import_module(module)
            out[peer] = None
        except Exception as e:  # an ImportError, or a peer that fails at import on this torch
            out[peer] = f"{type(e).__name__}: {e}".splitlines()[0]
    return out


def build_impls(S, E, M, F, k, peers, bf16_gemm_baseline=None):
    """Every implementation of one case, in round order; `peers` lists the peers to include."""
    torch.manual_seed(0)
    impls = [OursImpl("ours", S, E, M, F, k)]
    impls.append(FloorImpl(impls[0]))
    if "deepspeed" in peers:
        torch.manual_seed(0)
        impls += [OursImpl("ours_cf1", S, E, M, F, k, capacity_factor=1.0)]
        torch.manual_seed(0)
        impls += [DeepSpeedImpl(S, E, M, F, k)]
    if "torchtitan" in peers or bf16_gemm_baseline:
        torch.manual_seed(0)
        impls += [OursImpl("ours_bf16", S, E, M, F, k, bf16=True)]
    if "torchtitan" in peers:
        torch.manual_seed(0)
        impls += [TorchtitanImpl(S, E, M, F, k)]
    if bf16_gemm_baseline:
        torch.manual_seed(0)
        impls += [OursImpl(f"ours_bf16_gemm_{bf16_gemm_baseline}", S, E, M, F, k, bf16=True, gemm=bf16_gemm_baseline)]
    return impls


def build_one(name, S, E, M, F, k):
    """One implementation by name, for the peak-memory worker."""
    torch.manual_seed(0)
    if name == "ours":
        return OursImpl(name, S, E, M, F, k)
    if name == "ours_cf1":
        return OursImpl(name, S, E, M, F, k, capacity_factor=1.0)
    if name == "ours_bf16":
        return OursImpl(name, S, E, M, F, k, bf16=True)
    if name.startswith("ours_bf16_gemm_"):  # ours in bf16 with a fixed GEMM mode (--bf16-gemm-baseline)
        return OursImpl(name, S, E, M, F, k, bf16=True, gemm=name[len("ours_bf16_gemm_"):])
    if name == "floor":
        return FloorImpl(OursImpl("ours", S, E, M, F, k))
    return {"deepspeed": DeepSpeedImpl, "torchtitan": TorchtitanImpl}[name](S, E, M, F, k)


# --------------------------------------------------------------------------- measurement

def peak_worker(name, S, E, M, F, k, threads):
    """In a fresh process: MB of peak RSS above the pre-step RSS for one forward + backward,
    minus the parameter gradients (model state, not step memory)."""
    torch.set_num_threads(threads)
    impl = build_one(name, S, E, M, F, k)
    base.zero_grads(impl)
    grad_kb = sum(p.numel() * p.element_size() for p in impl.module.parameters() if p.requires_grad) / 1024.0
    return base.step_peak_mb(impl, grad_kb)


def measure_peak(name, S, E, M, F, k, threads):
    # the script, not this module's file: a module of the package runs only as part of it
    cmd = [sys.executable, "-W", "ignore", str(REPO / "scripts" / "bench_moe_peers.py"), "--_peak-worker", name,
           "--omp-wait-policy", base.OMP_WAIT_POLICY, "--case", f"{E}:{S}", "--model-dim", str(M),
           "--ffn-dim", str(F), "--k", str(k), "--threads", str(threads)]
    return base.run_peak_worker(cmd, name)


def timed_step(impl):
    """(wall ms, process CPU ms) of one forward + backward: on a loaded machine the wall time
    includes waiting for a core; with one thread and OMP_WAIT_POLICY=PASSIVE the CPU time is
    the work done."""
    base.zero_grads(impl)
    w0, c0 = time.perf_counter(), time.process_time()
    impl.step()
    return (time.perf_counter() - w0) * 1000.0, (time.process_time() - c0) * 1000.0


def time_rounds(impls, warmup, repeats):
    """({name: [wall ms per round]}, {name: [CPU ms per round]}): every round runs every
    implementation once, in order."""
    wall = {impl.name: [] for impl in impls}
    cpu = {impl.name: [] for impl in impls}
    for r in range(warmup + repeats):
        for impl in impls:
            w, c = timed_step(impl)
            if r >= warmup:
                wall[impl.name].append(w)
                cpu[impl.name].append(c)
    return wall, cpu


# Each row: (peer, its implementation, the ours it is paired with, how ours is set up).
PAIRS = [
    ("deepspeed", "deepspeed", "ours_cf1", "top2, capacity factor 1.0, fp32"),
    ("torchtitan", "torchtitan", "ours_bf16", "top2, dropless, bf16 autocast"),
    ("torchtitan", "torchtitan", "ours", "top2, dropless, fp32"),
    ("expert_gemms_alone", "floor", "ours", "top2, dropless, fp32"),
]


def run_case(S, E, args, peers):
    load_before = os.getloadavg()[0]
    impls = build_impls(S, E, args.model_dim, args.ffn_dim, args.k, peers, args.bf16_gemm_baseline)
    times, cpu = time_rounds(impls, args.warmup, args.repeats)
    names = [impl.name for impl in impls]
    del impls
    gc.collect()
    peak = {}
    if not args.skip_peak_mem:
        for name in names:
            peak[name] = measure_peak(name, S, E, args.model_dim, args.ffn_dim, args.k, args.threads)
    common = dict(model_dim=args.model_dim, ffn_dim=args.ffn_dim, threads=args.threads,
                  omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), repeats=args.repeats, warmup=args.warmup,
                  load_before=round(load_before, 2), load_after=round(os.getloadavg()[0], 2))
    rows = []
    pairs = list(PAIRS)
    if args.bf16_gemm_baseline:
        name = f"ours_bf16_gemm_{args.bf16_gemm_baseline}"
        pairs.append((name, name, "ours_bf16", "top2, dropless, bf16 autocast"))
    for peer, impl, ours, setup in pairs:
        if impl not in times or ours not in times:
            continue
        rows.append(make_row(peer, S, E, args.k, times[impl], times[ours], ours_setup=setup,
                             peak_mb_peer=peak.get(impl), peak_mb_ours=peak.get(ours),
                             cpu_ms_peer=round(statistics.median(cpu[impl]), 2),
                             cpu_ms_ours=round(statistics.median(cpu[ours]), 2),
                             paired_ratio_cpu=round(paired_ratio(cpu[impl], cpu[ours]), 3),
                             ms_all_peer=[round(t, 2) for t in times[impl]],
                             ms_all_ours=[round(t, 2) for t in times[ours]],
                             cpu_ms_all_peer=[round(t, 2) for t in cpu[impl]],
                             cpu_ms_all_ours=[round(t, 2) for t in cpu[ours]], **common))
    return rows


def markdown_table(rows):
    lines = ["| peer | S | E | k | ours set up as | peer (ms) | ours (ms) | peer / ours, paired "
             "| CPU: peer / ours, paired | peak MB peer | peak MB ours |",
             "|:---|---:|---:|---:|:---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['peer']} | {r['tokens']} | {r['experts']} | {r['k']} | {r.get('ours_setup', '')} "
                     f"| {r['ms_peer']:.1f} | {r['ms_ours']:.1f} | {r['paired_ratio']:.2f}x "
                     f"| {base.fmt(r.get('paired_ratio_cpu'), '{:.2f}x')} "
                     f"| {base.fmt(r.get('peak_mb_peer'), '{:.0f}')} | {base.fmt(r.get('peak_mb_ours'), '{:.0f}')} |")
    return "\n".join(lines)


def wide_table(rows):
    """One line per (S, E): ours against its floor and each peer.  Times are medians of process
    CPU time (the work done: on a loaded machine wall time adds the wait for a core); ratios are
    paired, wall time; CPU time."""
    by_case = {}
    for r in rows:
        by_case.setdefault((r["experts"], r["tokens"]), {})[(r["peer"], r.get("ours_setup", ""))] = r
    lines = ["| E | S | ours fp32 (CPU ms) | floor (CPU ms) | not expert GEMMs | ours cf 1 (CPU ms) | DeepSpeed (CPU ms) "
             "| DeepSpeed / ours | ours bf16 (CPU ms) | torchtitan (CPU ms) | torchtitan / ours bf16 "
             "| torchtitan / ours fp32 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def pair(r):
        return "null" if r is None else f"{r['paired_ratio']:.2f}x; {r['paired_ratio_cpu']:.2f}x"

    for (E, S), case in sorted(by_case.items()):
        floor = case.get(("expert_gemms_alone", "top2, dropless, fp32"))
        ds = case.get(("deepspeed", "top2, capacity factor 1.0, fp32"))
        tt16 = case.get(("torchtitan", "top2, dropless, bf16 autocast"))
        tt32 = case.get(("torchtitan", "top2, dropless, fp32"))
        ms = lambda r, key: "null" if r is None else f"{r[key]:.0f}"  # noqa: E731
        share = "null" if floor is None else f"{100 * (1 - floor['paired_ratio_cpu']):.0f}%"
        lines.append(f"| {E} | {S} | {ms(floor, 'cpu_ms_ours')} | {ms(floor, 'cpu_ms_peer')} | {share} "
                     f"| {ms(ds, 'cpu_ms_ours')} | {ms(ds, 'cpu_ms_peer')} | {pair(ds)} | {ms(tt16, 'cpu_ms_ours')} "
                     f"| {ms(tt16, 'cpu_ms_peer')} "
                     f"| {pair(tt16)} | {pair(tt32)} |")
    return "\n".join(lines)


def versions():
    out = {"torch": torch.__version__}
    for name in ("deepspeed", "torchtitan"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            out[name] = None
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", type=parse_case, action="append", metavar="E:S,S,...",
                   help=f"experts and token counts (repeatable; default {' '.join(DEFAULT_CASES)})")
    p.add_argument("--model-dim", type=int, default=512)
    p.add_argument("--ffn-dim", type=int, default=2048)
    p.add_argument("--k", type=int, default=2, choices=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peers", nargs="*", default=["deepspeed", "torchtitan"], choices=["deepspeed", "torchtitan"],
                   help="peers to include (each skipped with a note when it does not import)")
    p.add_argument("--bf16-gemm-baseline", choices=["loop", "bmm"],
                   help="also time ours in bf16 with this fixed GEMM mode (e.g. loop: the rule before the "
                        "aligned mode), paired with ours in bf16 under the automatic choice")
    p.add_argument("--skip-peak-mem", action="store_true")
    p.add_argument("--omp-wait-policy", choices=["passive", "active", "inherit"], default="passive",
                   help="OMP_WAIT_POLICY for every implementation (see bench_moe_layer.py)")
    p.add_argument("--json", metavar="PATH", help="write the rows here (a list, see ROW_KEYS)")
    p.add_argument("--print-table", metavar="PATH", help="print the tables of a rows file, run nothing")
    p.add_argument("--_peak-worker", dest="peak_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.case = args.case or [parse_case(c) for c in DEFAULT_CASES]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.print_table:
        with open(args.print_table) as f:
            rows = check_rows(json.load(f))
        print(markdown_table(rows) + "\n\n" + wide_table(rows))
        return rows
    if args.peak_worker:
        E, tokens = args.case[0]
        print(json.dumps(peak_worker(args.peak_worker, tokens[0], E, args.model_dim, args.ffn_dim, args.k,
                                     args.threads)))
        return None
    torch.set_num_threads(args.threads)
    missing = {peer: why for peer, why in peers_available().items() if peer in args.peers and why}
    for peer, why in missing.items():
        print(f"{peer} left out: {why} (pip install -e \".[bench-peers]\")", file=sys.stderr)
    peers = [peer for peer in args.peers if peer not in missing]
    print(f"{versions()}, {torch.get_num_threads()} threads, M={args.model_dim} F={args.ffn_dim} k={args.k}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, load {os.getloadavg()}", flush=True)
    rows = []
    for E, tokens in args.case:
        for S in tokens:
            t0 = time.time()
            case_rows = run_case(S, E, args, peers)
            rows += case_rows
            print(f"S={S} E={E}: " + ", ".join(f"{r['peer']}/{r['ours_setup'].split(', ', 1)[1]} "
                                               f"{r['paired_ratio']:.2f}x (CPU {r['paired_ratio_cpu']:.2f}x)" for r in case_rows)
                  + f" ({time.time() - t0:.0f} s)", flush=True)
    print(f"load after: {os.getloadavg()}")
    print(markdown_table(rows) + "\n\n" + wide_table(rows))
    if args.json:
        base.atomic_write_json(args.json, check_rows(rows))
    return rows


cli_main = main  # as the command has always run: argparse's errors, no excepthook


if __name__ == "__main__":
    cli_main()
