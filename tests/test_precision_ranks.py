"""Mixed precision with expert parallelism across ranks: fairseq's CUDA-only decisions (the
ranks' gradient-norm check, the AMP loss scaler's overflow decision) forced on CPU across 2
gloo ranks, and --bf16 training without a TPU.

Each rank holds a shared parameter (equal on every rank, as after data-parallel averaging) and
an `expert` parameter whose gradient differs per rank, as expert parallelism makes them."""
import datetime
import re
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf, open_dict

import moe_fairseq.plugin  # noqa: F401  (installs the patches, as --user-dir does)
from cli_helpers import free_port, make_tiny_corpus, run, train_cmd


def _fairseq_cfg(**common):
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.optim.adam import FairseqAdamConfig

    cfg = OmegaConf.structured(FairseqConfig())
    with open_dict(cfg):
        cfg.optimizer = OmegaConf.structured(FairseqAdamConfig(lr=[1e-3]))
        cfg.optimizer._name = "adam"
        cfg.optimizer.tpu = False
        for key, value in common.items():
            cfg.common[key] = value
    return cfg


def _params(rank):
    shared = torch.nn.Parameter(torch.ones(4))
    expert = torch.nn.Parameter(torch.full((3,), float(rank + 1)))
    expert.expert = True
    return shared, expert


def _world(rank, port, fn, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        out[rank] = fn(rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def on_two_ranks(fn):
    out = mp.Manager().dict()
    mp.start_processes(_world, args=(free_port(), fn, out), nprocs=2, join=True, start_method="fork")
    return dict(out)


def _fp16_grad_norm_check(rank):
    """fairseq's FP16Optimizer built by the trainer's call for --fp16 (flat master copy asked
    for), the gradient norm it computes, and Trainer._check_grad_norms with the buffer fairseq
    allocates on CUDA only."""
    from fairseq.optim.fp16_optimizer import FP16Optimizer
    from fairseq.trainer import Trainer

    cuda_current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0  # the flat copy asks for it as a dict key only
    try:
        shared, expert = _params(rank)
        half = [shared.data.half(), expert.data.half()]
        shared.data, expert.data = half
        cfg = _fairseq_cfg(fp16=True, fp16_no_flatten_grads=False)
        opt = FP16Optimizer.build_optimizer(cfg, [shared, expert])
    finally:
        torch.cuda.current_device = cuda_current_device
    # gradients 0.5 for the shared parameter, rank + 1 for the expert (differs between ranks)
    opt.backward((shared * 0.5).sum() + (expert * (rank + 1)).sum())
    norm = opt.clip_grad_norm(0.0)
    trainer = SimpleNamespace(_grad_norm_buf=torch.zeros(2, dtype=torch.double), data_parallel_rank=rank,
                              data_parallel_process_group=None, cfg=cfg)
    Trainer._check_grad_norms(trainer, norm)  # raises FloatingPointError when the norms differ
    return float(norm), opt.has_flat_params


def test_fp16_with_expert_parallelism_keeps_the_ranks_grad_norms_equal():
    out = on_two_ranks(_fp16_grad_norm_check)
    (norm0, flat0), (norm1, flat1) = out[0], out[1]
    assert not flat0 and not flat1, "the fp32 master copy must be kept per parameter"
    # sqrt(4 * 0.5^2) = 1, the shared gradient only, times the loss scale (128) fairseq unscales later
    assert norm0 == norm1 == pytest.approx(128.0)


def _amp_overflow_on_one_rank(rank):
    """fairseq's AMPOptimizer with torch's CPU loss scaler; rank 1's expert gradient overflows."""
    from fairseq.optim.amp_optimizer import AMPOptimizer

    shared, expert = _params(rank)
    cfg = _fairseq_cfg(amp=True)
    opt = AMPOptimizer.build_optimizer(cfg, [shared, expert])
    opt._grad_scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
    opt.backward((shared.sum() + expert.sum()) * 0.5)
    if rank == 1:
        expert.grad[0] = float("inf")
    opt.clip_grad_norm(0.0)
    opt.step()
    return shared.detach().clone(), float(opt.scaler.get_scale())


def test_amp_overflow_on_one_rank_skips_the_step_on_every_rank():
    out = on_two_ranks(_amp_overflow_on_one_rank)
    (shared0, scale0), (shared1, scale1) = out[0], out[1]
    assert torch.equal(shared0, torch.ones(4)) and torch.equal(shared1, torch.ones(4)), \
        "a rank stepped while another skipped: the shared weights drift apart"
    assert scale0 == scale1 == 64.0  # both halved their loss scale


def _amp_no_overflow(rank):
    from fairseq.optim.amp_optimizer import AMPOptimizer

    shared, expert = _params(rank)
    opt = AMPOptimizer.build_optimizer(_fairseq_cfg(amp=True), [shared, expert])
    opt._grad_scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
    opt.backward((shared.sum() + expert.sum()) * 0.5)
    opt.clip_grad_norm(0.0)
    opt.step()
    return shared.detach().clone(), float(opt.scaler.get_scale())


def test_amp_without_overflow_steps_on_every_rank():
    out = on_two_ranks(_amp_no_overflow)
    assert not torch.equal(out[0][0], torch.ones(4)) and torch.equal(out[0][0], out[1][0])
    assert out[0][1] == out[1][1] == 128.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("bf16_corpus"), n_train=120)


@pytest.mark.parametrize("flag", ["--bf16", "--memory-efficient-bf16"])
def test_bf16_trains_without_a_tpu(data, tmp_path, flag):
    """fairseq 0.12 turns --bf16 into --tpu; the run must train in bfloat16 on the CPU here (on
    a GPU there), not die importing torch_xla."""
    proc = run(train_cmd(data, tmp_path / "bf16", "--moe-expert-count", "4", flag, max_update=3))
    log = proc.stdout + proc.stderr
    losses = [float(v) for v in re.findall(r"train_inner \|.*?\bloss=([0-9.]+)", log)]
    assert len(losses) == 3 and all(0 < v < 20 for v in losses)
    state = torch.load(tmp_path / "bf16" / "checkpoint_last.pt", weights_only=False)
    assert state["cfg"]["common"]["bf16"] and not state["cfg"]["common"]["tpu"]


@pytest.mark.parametrize("version,ok", [("2.4.0", True), ("2.13.0+cpu", True), ("2.10.1", True),
                                        ("2.3.1+cu121", False), ("2.1.0", False), ("1.13.1", False),
                                        ("2.6.0a0+git1234", True)])
def test_torch_floor_is_a_one_line_error(version, ok):
    from moe_fairseq.moe.errors import MoEUsageError
    from moe_fairseq.moe.torch_version import check_torch_version

    if ok:
        check_torch_version(version)
    else:
        with pytest.raises(MoEUsageError, match=rf"^moe_fairseq needs torch >= 2\.4 \(found {re.escape(version)}\)"):
            check_torch_version(version)
