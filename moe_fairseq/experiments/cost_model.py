"""All-to-all cost of expert parallelism on a real cluster, and what Gating Dropout saves.

    python scripts/cost_model.py --nodes 1 2 4 8 16 --gpus-per-node 8 --intra-gbps 1200 \
        --inter-gbps 100 --tokens-per-gpu 4096 --model-dim 1024 --ffn-dim 4096 --png docs/cost_model.png

Model (assumptions, stated so they can be argued with):
- W = nodes x GPUs-per-node ranks, one expert-parallel group; routing is uniform, so a rank sends
  a share 1/W of its dispatched rows to every rank: (G-1)/W inside its node, (W-G)/W to other
  nodes, 1/W to itself (free).
- Per MoE layer and training step there are 4 all-to-alls (dispatch and combine, forward and
  backward), each moving tokens x k x model_dim x bytes per rank.
- Links: a node's NIC (inter_gbps, Gbit/s) is shared by its G GPUs; intra-node traffic runs at
  intra_gbps per GPU (NVLink/NVSwitch); an all-to-all takes
  latency + inter_bytes / (inter_bw / G) + intra_bytes / intra_bw (no overlap between the two,
  none with compute: the pessimistic, common case without Tutel-style pipelining).
- Compute: 6 x active parameters x tokens FLOPs per step (forward + backward) at
  `tflops` effective per GPU; active parameters per layer: 4 M^2 attention (+4 M^2 cross attention
  in the decoder) + 2 M F FFN, times k for a MoE FFN.
- Gating Dropout at rate p: a dropped layer-step issues no all-to-all, so expected a2a time is
  (1 - p) of baseline.  gate_drop sends each token to one local expert instead of k
  (expert compute x (1 - p + p/k)); gate_expert_drop skips the experts (x (1 - p)); local_topk
  keeps k experts per token, on the token's own rank (x 1: only the all-to-all is saved).
Outputs a table, optional JSON and PNG (a2a share of the step vs nodes; speedup vs p).
"""
import argparse
import json


def expert_compute_scale(p, mode="gate_drop", k=2):
    """Expected expert compute at Gating Dropout rate p, as a fraction of p = 0's: a dropped
    layer-step sends each token to one local expert instead of k (gate_drop), to none
    (gate_expert_drop), or to k local experts (local_topk: the same compute)."""
    if mode == "gate_drop":
        return 1 - p + p / k
    if mode == "gate_expert_drop":
        return 1 - p
    if mode == "local_topk":
        return 1.0
    raise ValueError(f"mode must be gate_drop, gate_expert_drop or local_topk (got {mode!r})")


def speedup_from_share(a2a_share, p, mode="gate_drop", k=2, expert_share=0.0):
    """Step speedup of Gating Dropout at rate p over p = 0, given the measured all-to-all share
    of a p = 0 step and the experts' share of its remaining (compute) time: the same model as
    step_times (a dropped layer-step issues no all-to-all and scales the expert compute by
    expert_compute_scale; everything else, including other communication, is unchanged), with
    the two measured shares in place of the cluster's links and FLOPs."""
    compute = 1 - a2a_share
    step = compute * (1 - expert_share + expert_share * expert_compute_scale(p, mode, k)) + a2a_share * (1 - p)
    return 1 / step


def step_times(a, nodes, p=0.0, mode="gate_drop"):
    world = nodes * a.gpus_per_node
    g = a.gpus_per_node
    row_bytes = a.tokens_per_gpu * a.k * a.model_dim * a.bytes_per_element
    inter = row_bytes * (world - g) / world
    intra = row_bytes * (g - 1) / world
    inter_bw = a.inter_gbps * 1e9 / 8 / g  # bytes/s per GPU
    intra_bw = a.intra_gbps * 1e9 / 8
    one_a2a = a.latency_us * 1e-6 * (world > 1) + inter / inter_bw + intra / intra_bw
    a2a = 4 * a.moe_layers * one_a2a * (1 - p)
    M, F = a.model_dim, a.ffn_dim
    layers = a.encoder_layers + a.decoder_layers
    attention = (4 * M * M) * layers + 4 * M * M * a.decoder_layers
    dense_ffn = 2 * M * F * (layers - a.moe_layers)
    expert_ffn = 2 * M * F * a.k * a.moe_layers
    expert_scale = expert_compute_scale(p, mode, a.k)
    flops = 6 * a.tokens_per_gpu * (attention + dense_ffn + expert_ffn * expert_scale)
    compute = flops / (a.tflops * 1e12)
    return a2a, compute


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-gbps", type=float, default=1200.0, help="per-GPU intra-node bandwidth, Gbit/s")
    p.add_argument("--inter-gbps", type=float, default=100.0, help="per-node NIC bandwidth, Gbit/s")
    p.add_argument("--latency-us", type=float, default=30.0, help="fixed cost of one all-to-all")
    p.add_argument("--tokens-per-gpu", type=int, default=4096)
    p.add_argument("--model-dim", type=int, default=1024)
    p.add_argument("--ffn-dim", type=int, default=4096)
    p.add_argument("--encoder-layers", type=int, default=12)
    p.add_argument("--decoder-layers", type=int, default=12)
    p.add_argument("--moe-layers", type=int, default=12, help="MoE layers (every other FFN of 12+12)")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--bytes-per-element", type=int, default=2)
    p.add_argument("--tflops", type=float, default=40.0, help="effective TFLOP/s per GPU (V100 fp16 ~ 30-50)")
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5])
    p.add_argument("--json")
    p.add_argument("--png")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    records = []
    for nodes in a.nodes:
        base_a2a, base_compute = step_times(a, nodes)
        for mode in ("gate_drop", "gate_expert_drop"):
            for p in a.rates:
                a2a, compute = step_times(a, nodes, p, mode)
                records.append({"nodes": nodes, "gpus": nodes * a.gpus_per_node, "mode": mode, "p": p,
                                "a2a_ms": round(a2a * 1e3, 2), "compute_ms": round(compute * 1e3, 2),
                                "a2a_share": round(a2a / (a2a + compute), 3),
                                "speedup": round((base_a2a + base_compute) / (a2a + compute), 3)})
    print("| nodes | GPUs | mode | p | a2a ms | compute ms | a2a share | speedup vs p=0 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['nodes']} | {r['gpus']} | {r['mode']} | {r['p']} | {r['a2a_ms']} | {r['compute_ms']} | "
              f"{r['a2a_share']:.1%} | {r['speedup']:.2f}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "records": records}, f, indent=1)
    if a.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        base = [r for r in records if r["p"] == 0 and r["mode"] == "gate_drop"]
        left.plot([r["gpus"] for r in base], [100 * r["a2a_share"] for r in base], marker="o")
        left.set_xscale("log", base=2)
        left.set_xlabel("GPUs (8 per node)")
        left.set_ylabel("all-to-all share of a step (%)")
        left.set_title("Expert-parallel all-to-all cost")
        for nodes in a.nodes:
            rs = [r for r in records if r["nodes"] == nodes and r["mode"] == "gate_drop"]
            right.plot([r["p"] for r in rs], [r["speedup"] for r in rs], marker="o", label=f"{nodes} node(s)")
        right.set_xlabel("Gating Dropout rate p (gate_drop)")
        right.set_ylabel("step speedup vs p = 0")
        right.set_title("Expected speedup from Gate-Drop")
        right.legend()
        fig.tight_layout()
        fig.savefig(a.png, dpi=120)
        print(f"wrote {a.png}")
    return records


cli_main = main  # as the command has always run: argparse's errors, no excepthook


if __name__ == "__main__":
    cli_main()
