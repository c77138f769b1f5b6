"""Expert parallelism with gloo on CPU: W = 2 and 4 processes against the single-process layer.

Each test starts W processes (tests/ep_worker.py, forked where possible) that run several scenarios in one process
group; every comparison happens inside the workers (tolerance 1e-5, float32).
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ep_worker
from cli_helpers import free_port
from moe_fairseq.moe.all_to_all import A2AStats
from moe_fairseq.moe.expert_parallel import expert_destination, expert_sharding

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


# fork skips re-importing torch in every worker (seconds each on a loaded 2-core machine); the
# parent never initialises torch.distributed and runs torch with one thread, so forking is safe.
# MOE_EP_TEST_START_METHOD=spawn selects the slower, fully isolated start.
START_METHOD = os.environ.get("MOE_EP_TEST_START_METHOD",
                              "fork" if "fork" in mp.get_all_start_methods() else "spawn")


def spawn(world_size, *jobs):
    mp.start_processes(ep_worker.run, args=(world_size, free_port(), list(jobs)), nprocs=world_size, join=True,
                       start_method=START_METHOD)


# ------------------------------------------------------------------ no processes needed
@pytest.mark.parametrize("E,W,expected", [(4, 2, (2, 1)), (4, 4, (1, 1)), (2, 4, (1, 2)), (8, 2, (4, 1)),
                                          (1, 4, (1, 4)), (3, 1, (3, 1))])
def test_sharding_rule(E, W, expected):
    assert expert_sharding(E, W) == expected


@pytest.mark.parametrize("E,W", [(3, 2), (6, 4), (4, 3)])
def test_sharding_error_message(E, W):
    with pytest.raises(ValueError) as err:
        expert_sharding(E, W)
    assert str(err.value) == (f"--moe-expert-count={E} cannot be sharded over a world size of {W}: "
                              f"it must be a multiple or a divisor of {W}")


def test_destinations():
    # E=4 over W=2: experts 0,1 on rank 0, experts 2,3 on rank 1, whatever the source.
    assert [expert_destination(g, r, 4, 2) for r in range(2) for g in range(4)] == [0, 0, 1, 1] * 2
    # E=2 over W=4 (R=2): expert g on ranks 2g, 2g+1; source r uses replica r % 2.
    assert [[expert_destination(g, r, 2, 4) for g in range(2)] for r in range(4)] == [[0, 2], [1, 3], [0, 2], [1, 3]]


def test_a2a_stats_counts_remote_bytes():
    s = A2AStats()
    s.record(torch.zeros(6, 4), [1, 2, 3], 1)
    assert (s.calls, s.bytes_sent, s.remote_bytes_sent) == (1, 96, 64)


# ------------------------------------------------------------------ W = 2
def test_w2_e4_two_local_experts():
    spawn(2,
          ("exchange_layout", dict(num_experts=4)),
          ("equivalence", dict(num_experts=4, router="top1", capacity_factor=0.5, expect_drops=True)),
          ("equivalence", dict(num_experts=4, router="top2")),
          ("equivalence", dict(num_experts=4, router="top2", dropless=True, seed=2)),
          ("equivalence", dict(num_experts=4, router="top2", capacity_factor=0.75, expect_drops=True, seed=3)))


def test_w2_e4_uneven_tokens_and_local_only_rank():
    spawn(2,
          # rank 0: 23 tokens all routed to its own experts (sends no row away); rank 1: 57 tokens.
          ("equivalence", dict(num_experts=4, router="top2", tokens=[23, 57], local_only_rank=0)),
          ("equivalence", dict(num_experts=4, router="top1", tokens=[9, 40], local_only_rank=1, capacity_factor=1.0)),
          # a rank with no token at all still joins every collective
          ("equivalence", dict(num_experts=4, router="top2", tokens=[0, 31], dropless=True)),
          # ... and one that also receives no row (its experts do not run; the backward
          # all-to-all must still be issued there)
          ("equivalence", dict(num_experts=4, router="top2", tokens=[0, 30], local_only_rank=1)))


def test_w2_bad_sharding_and_gating_dropout():
    spawn(2,
          ("bad_sharding", dict(num_experts=3)),
          ("gating_dropout", dict(num_experts=4, mode="gate_drop")),
          ("gating_dropout", dict(num_experts=4, mode="gate_expert_drop", p=0.5)),
          ("gating_dropout", dict(num_experts=4, mode="local_topk", p=0.5)),
          ("local_topk", dict(num_experts=4, router="top2", tokens=[19, 0])),
          ("local_topk", dict(num_experts=4, router="top1", capacity_factor=0.5, expect_drops=True)),
          ("local_topk", dict(num_experts=4, router="noisy_topk", tokens=[13, 27])))


# ------------------------------------------------------------------ W = 4
def test_w4_e4_one_expert_per_rank():
    spawn(4,
          ("exchange_layout", dict(num_experts=4)),
          ("equivalence", dict(num_experts=4, router="top1", capacity_factor=0.5, expect_drops=True)),
          ("equivalence", dict(num_experts=4, router="top2", dropless=True)))


def test_w4_e4_uneven_tokens_and_gating_dropout():
    spawn(4,
          ("equivalence", dict(num_experts=4, router="top1", tokens=[13, 0, 41, 26], local_only_rank=2,
                               dropless=True)),
          ("gating_dropout", dict(num_experts=4, mode="gate_drop", p=0.3)))


def test_w4_e2_replicated_experts():
    spawn(4,
          ("exchange_layout", dict(num_experts=2)),
          ("equivalence", dict(num_experts=2, router="top2")),
          ("equivalence", dict(num_experts=2, router="top1", capacity_factor=0.5, expect_drops=True)),
          ("equivalence", dict(num_experts=2, router="top2", dropless=True, tokens=[20, 7, 33, 12])),
          ("gating_dropout", dict(num_experts=2, mode="gate_drop", p=0.3)))


# ------------------------------------------------------------------ the GPU check's suite (gpu_check.sh step 3)
def test_device_follows_the_backend():
    assert ep_worker.device_for("gloo", 3, 0) == torch.device("cpu")
    assert ep_worker.device_for("gloo", 0, 8) == torch.device("cpu")
    assert ep_worker.device_for("nccl", 1, 2) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="local rank 2 needs a GPU of its own, but torch sees 2"):
        ep_worker.device_for("nccl", 2, 2)
    with pytest.raises(ValueError, match="--backend must be one of gloo, nccl"):
        ep_worker.device_for("mpi", 0, 0)


@pytest.mark.parametrize("world", [2, 4])
def test_the_gpu_check_suite_passes_on_gloo(world):
    """Every scenario gpu_check.sh runs on NCCL, here on gloo/CPU: a broken scenario is found in CI."""
    jobs = ep_worker.suite(world)
    assert {name for name, _ in jobs} == set(ep_worker.SCENARIOS) - {"bad_sharding", "peer_timeout"}
    assert len(ep_worker.suite(world, quick=True)) == 4
    spawn(world, *jobs)


def test_ep_worker_without_gpus_refuses_nccl_in_one_line():
    import subprocess
    import sys

    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs: nccl would run")
    proc = subprocess.run([sys.executable, "-W", "ignore", str(ep_worker.__file__), "--backend", "nccl", "--nprocs", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("ep_worker: error: --backend nccl: local rank 1 needs a GPU of its own, but torch "
                                   f"sees {torch.cuda.device_count() if torch.cuda.is_available() else 0} "
                                   "(one process per GPU)")


def test_w2_all_to_alls_on_their_own_group_and_generation_in_step():
    """A data-parallel all-reduce issued before the MoE exchanges on one rank and after them on
    the other does not pair with them; ranks decoding 5 and 2 steps stay in step.  Either one
    hangs without its fix (a shared group; no generate_in_step)."""
    spawn(2, ("own_group", dict(num_experts=4)), ("generation_in_step", dict(num_experts=4)), ("group_timeouts", {}))


PEER_TIMEOUT = """
import sys, torch.multiprocessing as mp
sys.path.insert(0, sys.argv[1])
import ep_worker
from cli_helpers import free_port
mp.start_processes(ep_worker.run, args=(2, free_port(), [("peer_timeout", {"hold": 120})]), nprocs=2,
                   join=True, start_method="spawn")
"""


def test_a_rank_waiting_for_a_hung_peer_fails_within_the_timeout():
    """A peer that never joins a collective fails the job after MOE_EP_WORKER_TIMEOUT seconds (not
    gloo's 30 minutes); cli_helpers.run kills the whole tree if it does not."""
    import subprocess
    import sys
    import time

    from cli_helpers import run

    start = time.time()
    try:
        proc = run([sys.executable, "-c", PEER_TIMEOUT, os.path.dirname(os.path.abspath(__file__))], check=False,
                   timeout=100, env={"MOE_EP_WORKER_TIMEOUT": "3"})
    except subprocess.TimeoutExpired:
        pytest.fail("rank 0 was still waiting for its hung peer after 100 s")
    assert proc.returncode != 0
    assert "rank 0, scenario peer_timeout" in proc.stderr, proc.stderr[-3000:]
    assert time.time() - start < 90
