"""moe_fairseq.experiments.bench_int8_kernels (scripts/bench_int8_kernels.py): each timed kernel
computes y = x W^T + b (against the product written out, within int8 rounding), and a tiny run
writes one row per (cache, shape, rows) with a time per kernel.  The timing itself is not a test."""
import json

import pytest
import torch

from moe_fairseq.experiments import bench_int8_kernels as bench


@pytest.mark.parametrize("kernel", bench.KERNELS)
def test_each_kernel_is_x_times_w_transposed_plus_b(kernel):
    n_in, n_out, rows = 16, 8, 3
    w = bench.weights(n_out, n_in, 1)[0]
    wt, b = w["fp32"]
    x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(1))
    expected = torch.tensor([[sum(x[r, i].item() * wt[i, o].item() for i in range(n_in)) + b[o].item()
                              for o in range(n_out)] for r in range(rows)])
    # int8 weights (and bf16 or int8 activations): |error| within a few % of the row's scale
    tol = 1e-5 if kernel == "fp32" else 0.05 * expected.abs().max().item()
    assert torch.allclose(bench.call(kernel, x, w[kernel]), expected, atol=tol)


def test_tiny_run_writes_a_row_per_case(tmp_path, capsys):
    out = tmp_path / "k.json"
    bench.main(["--json", str(out), "--rows", "1,4", "--shapes", "16x8", "--caches", "warm", "--repeats", "1",
                "--max-pack-rows", "1"])
    saved = json.loads(out.read_text())
    assert [(r["cache"], r["in"], r["out"], r["rows"]) for r in saved["results"]] == [("warm", 16, 8, 1),
                                                                                      ("warm", 16, 8, 4)]
    assert set(saved["results"][0]) >= {f"{k}_ms" for k in bench.KERNELS}
    assert "int8pack_bf16_ms" not in saved["results"][1]  # above --max-pack-rows
    assert saved["meta"]["repeats"] == 1
