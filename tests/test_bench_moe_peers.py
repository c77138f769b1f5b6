"""moe_fairseq.experiments.bench_moe_peers (scripts/bench_moe_peers.py): its pure functions
(paired ratio, row schema), the floor's rows against a brute-force regrouping, a tiny end-to-end run without peers, and each peer on tiny
tensors where its package is installed (CI has none: those tests skip).  The timing run itself is
not a test: it needs the peers and a long quiet window."""
import json
import os

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    # bench_moe_layer sets OMP_WAIT_POLICY at import (for the processes it starts): keep the
    # test process's environment as it was.
    saved = os.environ.get("OMP_WAIT_POLICY")
    from moe_fairseq.experiments import bench_moe_peers as module
    if saved is None:
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = saved
    return module


def test_paired_ratio_is_the_median_of_per_round_ratios(bench):
    # per-round ratios 2, 4, 1: median 2; the mean (2.33) and the ratio of medians (10 / 9) differ
    assert bench.paired_ratio([10.0, 40.0, 9.0], [5.0, 10.0, 9.0]) == 2.0
    assert bench.paired_ratio([3.0, 5.0], [1.0, 1.0]) == 4.0  # even count: mean of the middle two
    with pytest.raises(ValueError, match="as many peer as ours"):
        bench.paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        bench.paired_ratio([], [])


def test_row_schema(bench):
    row = bench.make_row("deepspeed", 512, 16, 2, [10.0, 40.0, 9.0], [5.0, 10.0, 9.0], ours_setup="x")
    assert list(row)[:7] == list(bench.ROW_KEYS)
    assert (row["ms_peer"], row["ms_ours"], row["paired_ratio"], row["ours_setup"]) == (10.0, 9.0, 2.0, "x")
    assert bench.check_rows([row]) == [row]
    json.dumps(row)
    for key in bench.ROW_KEYS:
        broken = {k: v for k, v in row.items() if k != key}
        with pytest.raises(ValueError, match=f"lacks {key}"):
            bench.check_rows([broken])
    with pytest.raises(ValueError, match="tokens must be int"):
        bench.check_rows([dict(row, tokens="512")])
    with pytest.raises(ValueError, match="k must be int"):
        bench.check_rows([dict(row, k=True)])
    with pytest.raises(ValueError, match="must be a list"):
        bench.check_rows({"rows": [row]})


def test_parse_case(bench):
    import argparse

    assert bench.parse_case("16:512,2048") == (16, [512, 2048])
    with pytest.raises(argparse.ArgumentTypeError, match="--case wants E:S"):
        bench.parse_case("16-512")


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_floor_gets_the_rows_the_layer_gives_its_experts(bench, capacity_factor):
    """The floor's rows and counts against a regrouping by hand of the router's choices: kept
    slots in slot order (token, then choice), grouped by expert."""
    S, E, M, F = 24, 4, 8, 16
    torch.manual_seed(0)
    ours = bench.OursImpl("ours", S, E, M, F, 2, capacity_factor=capacity_factor)
    torch.manual_seed(7)
    floor = bench.FloorImpl(ours)
    torch.manual_seed(7)  # the same Gumbel draw as the floor's routing
    with torch.no_grad():
        routing = ours.module.router(ours.x.detach())
    slots = [(t, j) for t in range(S) for j in range(2) if bool(routing.keep[t, j])]
    expected_counts = [sum(1 for t, j in slots if int(routing.expert_index[t, j]) == e) for e in range(E)]
    order = [t for e in range(E) for t, j in slots if int(routing.expert_index[t, j]) == e]
    assert floor.counts == expected_counts
    if capacity_factor is not None:
        assert sum(expected_counts) < 2 * S  # capacity dropped some slots
    torch.testing.assert_close(floor.x.detach(), ours.x.detach()[order])
    floor.step()  # the experts' forward and backward on those rows
    assert floor.x.grad is not None and ours.module.experts.w1.grad is not None


def test_main_without_peers_writes_rows(bench, tmp_path):
    out = tmp_path / "rows.json"
    rows = bench.main(["--case", "4:16", "--model-dim", "8", "--ffn-dim", "16", "--repeats", "2", "--warmup", "0",
                       "--skip-peak-mem", "--peers", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(rows))
    assert [r["peer"] for r in saved] == ["expert_gemms_alone"]
    row = bench.check_rows(saved)[0]
    assert (row["tokens"], row["experts"], row["k"], row["threads"]) == (16, 4, 2, 1)
    assert len(row["ms_all_peer"]) == len(row["ms_all_ours"]) == 2
    # the per-round times are stored rounded to 0.01 ms: the ratio recomputed from them agrees within that rounding
    assert row["paired_ratio"] == pytest.approx(bench.paired_ratio(row["ms_all_peer"], row["ms_all_ours"]), rel=0.1)


def _peer_or_skip(bench, peer):
    why = bench.peers_available()[peer]
    if why:
        pytest.skip(f"{peer} is not installed here ({why}): pip install -e \".[bench-peers]\"")


@pytest.mark.parametrize("peer", ["deepspeed", "torchtitan"])
def test_peer_runs_a_step(bench, peer):
    """Each peer as the benchmark sets it up: one forward + backward, gradients on its experts."""
    _peer_or_skip(bench, peer)
    S, E, M, F = 32, 4, 16, 32
    impl = bench.build_one(peer, S, E, M, F, 2)
    impl.step()
    assert impl.x.grad is not None and torch.isfinite(impl.x.grad).all()
    expert_grads = [p.grad for n, p in impl.module.named_parameters() if "expert" in n]
    assert expert_grads and all(g is not None for g in expert_grads)


def test_bf16_gemm_baseline_and_tables(bench, tmp_path, capsys):
    """--bf16-gemm-baseline adds ours in bf16 with that fixed GEMM mode, paired with ours in bf16;
    --print-table reads a rows file back and prints the floor's share of the step."""
    out = tmp_path / "rows.json"
    bench.main(["--case", "4:16", "--model-dim", "16", "--ffn-dim", "32", "--repeats", "2", "--warmup", "0",
                "--skip-peak-mem", "--peers", "--bf16-gemm-baseline", "loop", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["peer"], r["ours_setup"]) for r in rows] == [
        ("expert_gemms_alone", "top2, dropless, fp32"), ("ours_bf16_gemm_loop", "top2, dropless, bf16 autocast")]
    capsys.readouterr()
    floor = dict(rows[0], paired_ratio_cpu=0.75, cpu_ms_ours=100.0, cpu_ms_peer=80.0)
    path = tmp_path / "floor.json"
    path.write_text(json.dumps([floor]))
    assert bench.main(["--print-table", str(path)]) == [floor]
    table = capsys.readouterr().out
    assert "| 4 | 16 | 100 | 80 | 25% |" in table  # 1 - 0.75 of the step is not expert GEMMs
