"""Host syncs of the MoE layer, counted on CPU with moe_fairseq.moe.host_syncs (what would
synchronise the host with the GPU on CUDA), against the budget: at most 2 per training forward +
backward (the padding rows' nonzero and the one read of the split sizes), at most 1 per decoder
step, and one transfer for the statistics of all layers together."""
import json

import pytest
import torch
import torch.multiprocessing as mp

import ep_worker
from cli_helpers import free_port
from moe_fairseq.moe import host_syncs
from moe_fairseq.moe.host_syncs import HostSyncCounter

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_counter_sees_each_kind_of_sync():
    x = torch.arange(6)
    with HostSyncCounter() as c:
        x.tolist()
        float(x.sum())
        bool(x.sum() > 0)
        torch.bincount(x)
        x.nonzero()
        torch.tensor([1, 2])
        torch.repeat_interleave(torch.arange(3), x[:3])
        torch.repeat_interleave(torch.arange(3), x[:3], output_size=3)  # sized: no sync
        x.cpu()
        x.new_full((), 2.0)  # a fill kernel: no sync
        torch.zeros(3).scatter_add_(0, x[:3], torch.ones(3))
    assert dict(c.counts) == {"Tensor.tolist": 1, "_local_scalar_dense": 2, "bincount": 1, "nonzero": 1,
                              "lift_fresh": 1, "repeat_interleave": 1, "Tensor.cpu": 1}
    # the Tensor methods are restored
    assert torch.Tensor.tolist is not None and "counted" not in torch.Tensor.tolist.__name__


@pytest.mark.parametrize("scenario,budget", [("top2_train_fwd_bwd", 2), ("top1_train_fwd_bwd", 2),
                                             ("noisy_topk_train_fwd_bwd", 2), ("top2_decoder_step", 1),
                                             ("statistics_6_layers", 1)])
def test_single_process_budget(scenario, budget):
    torch.manual_seed(0)
    counter = host_syncs.SCENARIOS[scenario](torch.device("cpu"))
    assert counter.total <= budget, dict(counter.counts)


def test_statistics_cost_one_transfer_whatever_the_number_of_layers():
    assert host_syncs.statistics_syncs(1, "cpu").total == host_syncs.statistics_syncs(8, "cpu").total == 1


def test_measure_cli_writes_json(tmp_path):
    out = tmp_path / "syncs.json"
    host_syncs.main(["--json", str(out)])
    rows = json.loads(out.read_text())
    assert set(rows) == set(host_syncs.SCENARIOS)
    assert rows["top2_train_fwd_bwd"]["proxy"] == sum(rows["top2_train_fwd_bwd"]["by_op"].values())


def test_expert_parallel_budget_on_two_gloo_ranks():
    mp.start_processes(ep_worker.run, args=(2, free_port(), [("host_syncs", dict(num_experts=4))]),
                       nprocs=2, join=True, start_method="fork")
