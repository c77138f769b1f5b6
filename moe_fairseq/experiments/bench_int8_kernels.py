"""The int8 CPU kernels torch ships, against fp32, on the GEMM shapes of a Multi30k decoder step.

  python scripts/bench_int8_kernels.py --json docs/bench_int8_kernels.json [--rows 1,2,5,20,80,160,640]
      [--shapes 256x512,512x256,256x1024,1024x256,256x256,256x8000] [--repeats 9] [--threads 1]

Kernels, each y = x W^T (+ b) for x (rows, in) and W (out, in):
  fp32            torch.addmm on the fp32 weight (the fp32 model)
  int8pack_bf16   torch.ops.aten._weight_int8pack_mm: int8 weight, per-channel scales, bf16
                  activations (weight-only; its fp32 path has no vectorised kernel in torch 2.13)
  dynamic_int8    torch.ops.quantized.linear_dynamic (fbgemm, as quantize_dynamic): activations
                  quantized per call, int8 x int8 -> int32 (what moe/int8.py uses)

Cache state: "cold" cycles through enough distinct weights of the shape to fill 48 MB in fp32,
so each call reads its weight from beyond the core's L2 cache, as a decoder step does (it reads
every layer's weights once; the study's MoE model holds 65 MB of them); "warm" calls the same
weight again and again (it stays in L2: the best case for fp32).  Each (shape, rows) times the
kernels interleaved, their order rotated each round; reported: the median over rounds of the
time per call.
"""
import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

KERNELS = ("fp32", "int8pack_bf16", "dynamic_int8")
COLD_BYTES = 48 << 20


def weights(n_out, n_in, count, seed=0):
    """`count` weights of one shape in each kernel's form."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's deprecation of quantized tensor types
        for _ in range(count):
            w = torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5
            b = torch.randn(n_out, generator=gen)
            scale = w.abs().amax(1) / 127
            q = torch.round(w / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(n_out, dtype=torch.long), 0)
            out.append({"fp32": (w.t().contiguous(), b), "int8pack_bf16": (q, scale.bfloat16(), b),
                        "dynamic_int8": torch.ops.quantized.linear_prepack(qw, b)})
    return out


def call(kernel, x, w):
    if kernel == "fp32":
        return torch.addmm(w[1], x, w[0])
    if kernel == "int8pack_bf16":
        return torch.ops.aten._weight_int8pack_mm(x.bfloat16(), w[0], w[1]).float().add_(w[2])
    return torch.ops.quantized.linear_dynamic(x, w, True)


def time_one(shape, rows, cache, repeats, max_pack_rows):
    n_in, n_out = shape
    count = max(1, COLD_BYTES // (n_in * n_out * 4)) if cache == "cold" else 1
    ws = weights(n_out, n_in, count)
    calls = max(1, 64 // count)  # at least 64 calls a round
    x = torch.randn(rows, n_in)
    kernels = [k for k in KERNELS if k != "int8pack_bf16" or rows <= max_pack_rows]
    times = {k: [] for k in kernels}
    with torch.no_grad():
        for k in kernels:  # warm-up
            for w in ws:
                call(k, x, w[k])
        for r in range(repeats):
            for k in kernels[r % len(kernels):] + kernels[:r % len(kernels)]:
                start = time.perf_counter()
                for _ in range(calls):
                    for w in ws:
                        call(k, x, w[k])
                times[k].append((time.perf_counter() - start) * 1000 / (calls * len(ws)))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--rows", default="1,2,5,20,80,160,640")
    p.add_argument("--shapes", default="256x512,512x256,256x1024,1024x256,256x256,256x8000",
                   help="INxOUT: expert W1 / W2 (study MoE), dense FFN fc1 / fc2, attention, output projection")
    p.add_argument("--caches", default="cold,warm")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-pack-rows", type=int, default=80,
                   help="time int8pack_bf16 up to this many rows only (it is slow beyond)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows_list = [int(r) for r in args.rows.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    results = []
    for cache in args.caches.split(","):
        for shape in shapes:
            for rows in rows_list:
                ms = time_one(shape, rows, cache, args.repeats, args.max_pack_rows)
                results.append({"cache": cache, "in": shape[0], "out": shape[1], "rows": rows,
                                **{f"{k}_ms": round(v, 4) for k, v in ms.items()}})
                print(json.dumps(results[-1]), flush=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "quantized_engine": torch.backends.quantized.engine, "load_average": list(os.getloadavg()),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)


cli_main = main  # as the command has always run: argparse's errors, no excepthook


if __name__ == "__main__":
    cli_main()
