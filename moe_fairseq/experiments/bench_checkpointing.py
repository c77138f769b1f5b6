"""Memory of a stack of MoE encoder layers with and without --checkpoint-activations (CPU).

L fairseq encoder layers whose FFNs are all MoE layers (MoETransformerEncoderLayer, top-2,
dropless), one forward + backward on T x B tokens (after a warm-up step), each mode in a fresh process:

* held MB: RSS after the forward minus RSS before it: the activations kept for backward;
* peak MB: peak RSS of forward + backward (VmHWM, reset via /proc/self/clear_refs) minus the
  RSS before, minus the parameter gradients the step creates (model state, not activations);
Each worker runs with glibc's malloc returning every block of 64 KB or more to the system when
it is freed (MALLOC_MMAP_THRESHOLD_), so that RSS follows the live tensors instead of the
allocator's cache.

* s/step: wall time of the step; on this shared 2-core machine it says little (memory does).

    python scripts/bench_checkpointing.py [--layers 4 --tokens 64 --batch 32 ...] [--json PATH]
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

from .bench_moe_layer import status_kb
from .launch import REPO

MODES = ("plain", "checkpoint")


def worker(mode, a):
    from fairseq.models.transformer import TransformerConfig

    from ..models.moe_transformer_layers import MoETransformerEncoderLayer
    from ..moe import MoEConfig, build_moe_layer

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = TransformerConfig()
    cfg.encoder.embed_dim, cfg.encoder.ffn_embed_dim, cfg.encoder.attention_heads = a.model_dim, a.ffn_dim, 4
    cfg.checkpoint_activations = mode == "checkpoint"
    moe_cfg = MoEConfig(num_experts=a.experts, router="top2", dropless=True)
    layers = torch.nn.ModuleList(
        MoETransformerEncoderLayer(cfg, build_moe_layer(moe_cfg, a.model_dim, a.ffn_dim, i)) for i in range(a.layers))
    x = torch.randn(a.tokens, a.batch, a.model_dim, requires_grad=True)
    mask = torch.zeros(a.batch, a.tokens, dtype=torch.bool)
    grad_kb = sum(p.numel() * p.element_size() for p in layers.parameters()) / 1024.0

    def step():
        h = x
        for layer in layers:
            h = layer(h, mask)
        return h, status_kb("VmRSS")

    # One warm-up step first: kernels, thread pools and libraries allocate once, on first use.
    step()[0].float().pow(2).mean().backward()
    for param in [x, *layers.parameters()]:
        param.grad = None  # as fairseq's zero_grad leaves them
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = status_kb("VmRSS")
    start = time.perf_counter()
    h, after_forward = step()
    held = after_forward - before
    h.float().pow(2).mean().backward()
    seconds = time.perf_counter() - start
    peak = status_kb("VmHWM") - before - grad_kb
    return {"mode": mode, "held_mb": round(held / 1024, 1), "peak_mb": round(peak / 1024, 1),
            "s_per_step": round(seconds, 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64, help="sequence length T")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--model-dim", type=int, default=256)
    p.add_argument("--ffn-dim", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--_worker", dest="worker", choices=MODES, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a)))
        return
    args = sys.argv[1:] if argv is None else list(argv)
    records = []
    for mode in MODES:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        # the script, not this module's file: a module of the package runs only as part of it
        script = str(REPO / "scripts" / "bench_checkpointing.py")
        out = subprocess.run([sys.executable, script, *args, "--_worker", mode], check=True, capture_output=True,
                             text=True, env=env).stdout.strip().splitlines()[-1]
        records.append(json.loads(out))
    config = {k: getattr(a, k) for k in ("layers", "tokens", "batch", "model_dim", "ffn_dim", "experts", "threads")}
    print(json.dumps(config))
    print("| mode | held after forward (MB) | peak fwd+bwd (MB) | s/step |\n|---|---|---|---|")
    for r in records:
        print(f"| {r['mode']} | {r['held_mb']} | {r['peak_mb']} | {r['s_per_step']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": config, "records": records}, f, indent=1)


cli_main = main  # as the command has always run: argparse's errors, no excepthook


if __name__ == "__main__":
    cli_main()
