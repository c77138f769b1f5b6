"""The calibration on the emulated cluster: the cost model's speedup from a measured share
(against an enumeration of drop decisions), the interleaving schedule, the collective timer,
the fit of the compute share, the timed fairseq-train wrapper and a tiny layer-level run."""
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from cli_helpers import make_tiny_corpus, train_cmd
from moe_fairseq.experiments import calibrate_network, cost_model, step_timing
from test_emulated_cluster import _SKIP

REPO = Path(__file__).resolve().parents[1]


def brute_force_speedup(layers, a2a, expert, other, p, mode, k=2):
    """Expected step time over every combination of per-layer drop decisions (each with
    probability p), each layer owning a2a / layers of all-to-all and expert / layers of expert
    compute; a dropped layer keeps 1 of its k experts per token (gate_drop), none
    (gate_expert_drop) or all k (local_topk); speedup = p = 0 step time / expected step time."""
    kept = {"gate_drop": 1 / k, "gate_expert_drop": 0.0, "local_topk": 1.0}[mode]
    expected = 0.0
    for drops in itertools.product((False, True), repeat=layers):
        prob, t = 1.0, other
        for dropped in drops:
            prob *= p if dropped else 1 - p
            if dropped:
                t += expert / layers * kept
            else:
                t += a2a / layers + expert / layers
        expected += prob * t
    return (a2a + expert + other) / expected


@pytest.mark.parametrize("mode", step_timing.MODES)
@pytest.mark.parametrize("a2a,expert,other", [(1.0, 1.0, 1.0), (3.0, 0.5, 2.0), (0.0, 2.0, 1.0), (1.0, 0.0, 1.0)])
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_speedup_from_share_matches_enumeration(mode, a2a, expert, other, p):
    total = a2a + expert + other
    predicted = cost_model.speedup_from_share(a2a / total, p, mode, 2, expert / (expert + other))
    assert predicted == pytest.approx(brute_force_speedup(4, a2a, expert, other, p, mode), rel=1e-12)


def test_step_times_agree_with_speedup_from_share():
    """The cluster model (links, FLOPs) and the share form give the same speedup."""
    a = cost_model.build_parser().parse_args([])
    for mode in step_timing.MODES:
        base_a2a, base_compute = cost_model.step_times(a, 2)
        a2a, compute = cost_model.step_times(a, 2, 0.3, mode)
        a_zero = SimpleNamespace(**{**vars(a), "moe_layers": 0})  # compute without the experts' share
        _, non_expert = cost_model.step_times(a_zero, 2)
        non_expert -= 6 * a.tokens_per_gpu * 2 * a.model_dim * a.ffn_dim * a.moe_layers / (a.tflops * 1e12)
        share = base_a2a / (base_a2a + base_compute)
        expert_share = 1 - non_expert / base_compute
        assert cost_model.speedup_from_share(share, 0.3, mode, a.k, expert_share) == pytest.approx(
            (base_a2a + base_compute) / (a2a + compute), rel=1e-9)


def test_schedule_interleaves_every_setting_equally():
    warmup, block = 3, 2
    n = len(step_timing.SETTINGS)
    seen = [step_timing.setting_for_update(u, warmup, block) for u in range(warmup + block * n * 3)]
    assert seen[:warmup] == [("gate_drop", 0.0)] * warmup
    timed = seen[warmup:]
    assert all(timed.count(s) == block * 3 for s in step_timing.SETTINGS)
    assert all(timed[i] == timed[i + 1] for i in range(0, len(timed), block))  # blocks of `block`
    firsts = [timed[c * block * n] for c in range(3)]
    assert len(set(firsts)) == 3  # each cycle starts with a different setting


def test_collective_timer_counts_calls_bytes_and_time(monkeypatch):
    import torch

    def slow_a2a(output, input, *args, **kwargs):
        time.sleep(0.05)
        output.copy_(input)

    monkeypatch.setattr(dist, "all_to_all_single", slow_a2a)
    timer = step_timing.CollectiveTimer().install()
    try:
        x = torch.ones(10, 4)
        for _ in range(3):
            dist.all_to_all_single(torch.empty_like(x), x)
    finally:
        timer.uninstall()
    assert dist.all_to_all_single is slow_a2a
    assert timer.calls == 3 and timer.bytes == 3 * 10 * 4 * 4
    assert 0.15 <= timer.seconds < 1.0


def _synthetic_entry(share, expert_share, drops):
    entry = {"a2a_share": share, "drop_fraction": {}, "measured_speedup": {}}
    for mode in step_timing.MODES:
        entry["drop_fraction"][mode] = {str(p): drops[p] for p in step_timing.RATES}
        entry["measured_speedup"][mode] = {str(p): cost_model.speedup_from_share(share, drops[p], mode, 2, expert_share)
                                           for p in step_timing.RATES}
    return entry


def test_fit_recovers_the_compute_share():
    drops = {p: p for p in step_timing.RATES}  # the pooled speedups are at p
    for e in (0.0, 0.35, 0.8):
        assert calibrate_network.fit_expert_share(_synthetic_entry(0.1, e, drops)) == pytest.approx(e, abs=1e-9)


def test_summarize_run_pools_updates_on_a_line(tmp_path):
    """Steps whose time is exactly routed - saving x (dropped fraction): the pooled line recovers
    routed and saving per mode, whatever p each step ran at; a step's time is the slower rank's;
    the share is a2a / step time over the routed steps."""
    routed = {"gate_drop": 4.0, "gate_expert_drop": 5.0, "local_topk": 4.5}
    saving = {"gate_drop": 1.5, "gate_expert_drop": 3.0, "local_topk": 1.0}
    update = 0
    recs = {0: [], 1: []}
    for mode, p in step_timing.SETTINGS * 2:
        for layers_dropped in (0, 1, 2) if p > 0 else (0,):
            for rank in (0, 1):
                sec = routed[mode] - saving[mode] * layers_dropped / 2 - (0.1 if rank else 0.0)
                recs[rank].append({"rank": rank, "update": update, "warmup": False, "mode": mode, "p": p,
                                   "seconds": sec, "a2a_seconds": 0.25 * (sec + 0.1 * rank) * (layers_dropped == 0),
                                   "a2a_bytes": 2**20 * (2 - layers_dropped), "dropped_layers": layers_dropped,
                                   "moe_layers": 2})
            update += 1
    recs[0].append(dict(recs[0][0], update=-1, warmup=True, seconds=99.0))  # warm-up: ignored
    for rank in (0, 1):
        (tmp_path / f"rank{rank}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[rank]))
    got = calibrate_network.summarize_run(str(tmp_path))
    assert got["a2a_share"] == pytest.approx(0.25)
    for mode in step_timing.MODES:
        fit = got["modes"][mode]
        assert fit["routed_seconds"] == pytest.approx(routed[mode])
        assert fit["slope"] == pytest.approx(-saving[mode])
        assert fit["per_p"][0.3]["drop_fraction"] == pytest.approx(0.5)
        assert fit["per_p"][0.3]["direct_seconds"] == pytest.approx(routed[mode] - saving[mode] / 2)
        assert fit["per_p"][0.0]["a2a_mib"] == pytest.approx(2.0)


def test_timed_fairseq_train_records_the_schedule(tmp_path):
    data = make_tiny_corpus(tmp_path / "data", targets=("de",), n_train=200)
    out = tmp_path / "rank{rank}.jsonl"
    updates = 3 + len(step_timing.SETTINGS)  # the warm-up, then every setting once (every mode)
    cmd = train_cmd(data, tmp_path / "ckpt", "--moe-freq", "1", "--no-save", "--disable-validation",
                    max_update=updates, targets=("de",))
    cmd[0] = str(REPO / "scripts" / "timed_fairseq_train.py")
    env = dict(STEP_TIMING_OUT=str(out), STEP_TIMING_WARMUP="3", STEP_TIMING_BLOCK="1", STEP_TIMING_FIXED_BATCH="1",
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "rank0.jsonl").read_text().splitlines()]
    assert [r["update"] for r in recs] == list(range(updates))
    assert [(r["mode"], r["p"]) for r in recs] == [step_timing.setting_for_update(u, 3, 1) for u in range(updates)]
    assert {r["mode"] for r in recs} == set(step_timing.MODES)
    assert len({r["tokens"] for r in recs}) == 1, "STEP_TIMING_FIXED_BATCH: every update must see the same batch"
    # the drop count is the layers' own decision at that update and rate
    from moe_fairseq.moe.gating_dropout import gating_dropout_fires
    for r in recs:
        assert 0 <= r["dropped_layers"] <= r["moe_layers"] > 0
        if r["p"] == 0.0:
            assert r["dropped_layers"] == 0
    assert sum(r["dropped_layers"] for r in recs if r["p"] == 0.5) == sum(
        gating_dropout_fires(0.5, 3, u, i) for u in (r["update"] for r in recs if r["p"] == 0.5)
        for i in range(recs[0]["moe_layers"]))


@pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))
def test_layer_level_on_two_emulated_nodes(tmp_path):
    config = tmp_path / "tiny.args"
    config.write_text("# tiny\n--encoder-embed-dim 32\n--max-tokens 64\n--moe-expert-count 4\n--moe-expert-ffn-dim 16\n"
                      "--moe-router top2\n--moe-dropless\n")
    out = tmp_path / "net.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "calibrate_network.py"), "--levels", "layer",
                           "--layer-rates", "0", "--rounds", "1", "--layer-cycles", "1", "--config", str(config),
                           "--work-dir", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    (link,) = doc["layer_links"]
    assert link["rate_mbit"] == 0 and 0 < link["a2a_share"] < 1
    for mode in step_timing.MODES:
        assert set(link["steps_per_s"][mode]) == {"0.0", "0.1", "0.3", "0.5"}
        assert link["measured_speedup"][mode]["0.0"] == 1.0
        assert link["a2a_mib_per_step"][mode]["0.0"] > 0
    recs = [json.loads(line) for line in (tmp_path / "work" / "layer-0mbit-round0" / "rank0.jsonl").read_text().splitlines()]
    # a routed step calls the all-to-all 5 times (counts, rows there and back, their backward); a dropped one never
    assert {r["a2a_calls"] for r in recs if r["dropped_layers"] == 0} == {5}
    assert {r["a2a_calls"] for r in recs if r["dropped_layers"] == 1} <= {0}
    # resumable: a second call finds the run done and only re-summarizes
    again = subprocess.run([sys.executable, str(REPO / "scripts" / "calibrate_network.py"), "--levels", "layer",
                            "--layer-rates", "0", "--rounds", "1", "--config", str(config),
                            "--work-dir", str(tmp_path / "work")], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "layer at" not in again.stderr
