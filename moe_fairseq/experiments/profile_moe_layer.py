"""Where one forward + backward of the MoE layer spends its time, by stage (torch.profiler).

Stages: router (linear map, softmax, top-k, balance loss), capacity, sort (dispatch plan),
gather (dispatch), expert GEMMs, activation (and its derivative), other expert work (buffers,
bias gradients, casts), scatter (combine), statistics, and the rest (loss, autograd engine).
The library carries no profiler annotations (they would cost every call something): this script
wraps the stage functions in `record_function` labels for its own run, and splits the experts'
autograd Function by the aten op names inside it.  The backward of each stage is assigned by its
autograd node (IndexSelectBackward -> gather, ...).

The profiler records wall time per op, which on a shared machine includes the time the process
waited for a core.  So each stage's share of a step comes from the profiler (self time summed per
stage, median share over `--repeats` profiled steps) and is scaled by the step's process CPU time
(`time.process_time`, all threads, median of `--repeats` unprofiled steps): with
OMP_WAIT_POLICY=PASSIVE an idle OpenMP thread sleeps rather than spins, so CPU time is the work
done, whatever else runs on the machine.  The dense limit (one FFN on k*S rows) is timed alike.

    python -W ignore scripts/profile_moe_layer.py --tokens 512 2048 --k 1 2 --json docs/profile_moe_layer.json
"""
import argparse
import json
import os
import statistics
import time

# At import, before torch loads (scripts/profile_moe_layer.py imports this module first): an idle
# OpenMP thread then sleeps, so process CPU time is the work done (see above).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from ..moe import MoEConfig, build_moe_layer  # noqa: E402
from ..moe import layer as layer_mod  # noqa: E402
from ..moe.routers import base as router_base  # noqa: E402

STAGES = ["router", "capacity", "sort", "gather", "gemm", "activation", "experts_other", "scatter",
          "statistics", "rest"]
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "aten::matmul")
ACT_OPS = ("aten::relu", "aten::relu_", "aten::threshold_backward", "aten::gelu", "aten::gelu_backward",
           "aten::silu", "aten::silu_backward", "aten::clamp_min", "aten::clamp_min_")
# backward autograd nodes -> stage (the experts' Function is split by its aten ops, as forward)
BACKWARD = {"IndexSelectBackward": "gather", "IndexAddBackward": "scatter", "MulBackward": "scatter",
            "ToCopyBackward": "experts_other", "UnsqueezeBackward": "scatter",
            "SoftmaxBackward": "router", "MmBackward": "router", "LinearBackward": "router",
            "TBackward": "router", "MaxBackward": "router", "GatherBackward": "router",
            "DivBackward": "router", "SumBackward": "router", "MeanBackward": "router",
            "StackBackward": "router", "ScatterBackward": "router"}


def _wrap(obj, name, label):
    fn = getattr(obj, name)

    def wrapped(*a, **kw):
        with record_function("stage::" + label):
            return fn(*a, **kw)

    setattr(obj, name, wrapped)


def install_labels(layer):
    _wrap(layer_mod, "plan_dispatch", "sort")
    _wrap(layer_mod, "dispatch", "gather")
    _wrap(layer_mod, "combine", "scatter")
    _wrap(router_base, "apply_capacity", "capacity")
    _wrap(layer, "routing_stats", "statistics")
    _wrap(layer.experts, "forward", "experts")
    _wrap(layer.router, "forward", "router")


def classify(evt, stage):
    if stage != "experts":
        return stage
    if evt.name in GEMM_OPS:
        return "gemm"
    if evt.name in ACT_OPS:
        return "activation"
    return "experts_other"


def stage_of(evt):
    """The stage label of the nearest labelled ancestor (forward) or the backward node."""
    p = evt
    while p is not None:
        if p.name.startswith("stage::"):
            return p.name[len("stage::"):]
        if p.name.startswith("autograd::engine::evaluate_function: "):
            node = p.name.split(": ", 1)[1].rstrip("0123456789")
            if node.startswith("_GroupedFFNBackward"):
                return "experts"
            return BACKWARD.get(node, "rest")
        p = p.cpu_parent
    return "rest"


def breakdown(prof):
    ms = {s: 0.0 for s in STAGES}
    for evt in prof.events():
        if evt.name.startswith("stage::") or evt.name.startswith("autograd::engine"):
            continue
        stage = classify(evt, stage_of(evt))
        ms[stage] += evt.self_cpu_time_total / 1000.0
    return ms


def dense_step(S, M, F, k):
    net = nn.Sequential(nn.Linear(M, F), nn.ReLU(), nn.Linear(F, M)).train()
    x = torch.randn(k * S, M, requires_grad=True)

    def step():
        net.zero_grad(set_to_none=True)
        net(x).sum().backward()

    return step


def moe_step(S, E, M, F, k, capacity_factor):
    router = "top2" if k == 2 else "top1"
    cfg = MoEConfig(num_experts=E, router=router, dropless=capacity_factor is None,
                    capacity_factor=capacity_factor)
    layer = build_moe_layer(cfg, M, F).train()
    install_labels(layer)
    x = torch.randn(S, M, requires_grad=True)

    def step():
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        (out.sum() + sum(layer.aux.losses.values())).backward()

    return step


def cpu_ms(step, repeats, warmup):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        step()
        times.append((time.process_time() - t0) * 1000.0)
    return statistics.median(times)


def profile_shares(step, repeats):
    rounds = []
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        ms = breakdown(prof)
        total = sum(ms.values())
        rounds.append({s: v / total for s, v in ms.items()})
    return {s: statistics.median(r[s] for r in rounds) for s in STAGES}


def wgrad_floor_step(S, E, M, F, k):
    """The experts' two weight gradients alone, k*S rows split evenly over E experts: E GEMMs
    x_e^T g_e writing an (M, F) block each -- E times the dense FFN's weight-gradient output,
    whatever the number of rows.  With few rows per expert this write, not FLOPs, bounds a step."""
    n = k * S
    counts = [n // E + (e < n % E) for e in range(E)]
    x, h, g, gh = torch.randn(n, M), torch.randn(n, F), torch.randn(n, M), torch.randn(n, F)
    gw1, gw2 = torch.empty(E, M, F), torch.empty(E, F, M)

    def step():
        start = 0
        for e, c in enumerate(counts):
            torch.mm(h[start:start + c].t(), g[start:start + c], out=gw2[e])
            torch.mm(x[start:start + c].t(), gh[start:start + c], out=gw1[e])
            start += c

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--k", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--model-dim", type=int, default=512)
    p.add_argument("--ffn-dim", type=int, default=2048)
    p.add_argument("--capacity-factor", type=float, default=None, help="default: dropless")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    records = []
    for k in args.k:
        for S in args.tokens:
            step = moe_step(S, args.experts, args.model_dim, args.ffn_dim, k, args.capacity_factor)
            total = cpu_ms(step, args.repeats, args.warmup)
            shares = profile_shares(step, args.repeats)
            dense = cpu_ms(dense_step(S, args.model_dim, args.ffn_dim, k), args.repeats, args.warmup)
            floor = cpu_ms(wgrad_floor_step(S, args.experts, args.model_dim, args.ffn_dim, k),
                           args.repeats, args.warmup)
            norm = sum(shares.values())
            rec = {"tokens": S, "experts": args.experts, "k": k, "threads": args.threads,
                   "ms": {s: round(total * shares[s] / norm, 2) for s in STAGES},
                   "ms_total": round(total, 2), "ms_dense_limit": round(dense, 2),
                   "ms_expert_weight_grads_alone": round(floor, 2)}
            records.append(rec)
            print(json.dumps(rec), flush=True)
            # each profiled layer wraps the module functions again: undo by reloading labels
            _unwrap()
    print()
    print("| S | k | " + " | ".join(STAGES) + " | total | dense limit | expert weight grads alone |")
    print("|---:|---:|" + "---:|" * (len(STAGES) + 3))
    for r in records:
        print(f"| {r['tokens']} | {r['k']} | " + " | ".join(f"{r['ms'][s]:.1f}" for s in STAGES)
              + f" | {r['ms_total']:.1f} | {r['ms_dense_limit']:.1f} | {r['ms_expert_weight_grads_alone']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                       "torch": torch.__version__, "records": records}, f, indent=1)
            f.write("\n")


_ORIGINALS = {(layer_mod, n): getattr(layer_mod, n) for n in ("plan_dispatch", "dispatch", "combine")}
_ORIGINALS[(router_base, "apply_capacity")] = router_base.apply_capacity


def _unwrap():
    for (obj, name), fn in _ORIGINALS.items():
        setattr(obj, name, fn)


cli_main = main  # as the command has always run: argparse's errors, no excepthook


if __name__ == "__main__":
    cli_main()
