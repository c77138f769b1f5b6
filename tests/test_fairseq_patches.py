"""The joins with fairseq: the layer library imports no fairseq and patches nothing; the plugin
installs every patch of fairseq_patches.py once, for the supported fairseq versions only."""
import argparse
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from cli_helpers import REPO

NO_FAIRSEQ = r"""
import sys, torch
hook, safe = sys.excepthook, list(torch.serialization.get_safe_globals())
import moe_fairseq, moe_fairseq.moe, moe_fairseq.experiments.plots, moe_fairseq.tools.evaluate, moe_fairseq.tools.consolidate
assert "fairseq" not in sys.modules, "the layer library imported fairseq"
assert sys.excepthook is hook and list(torch.serialization.get_safe_globals()) == safe, "an import patched something"
"""


def python(code, **kwargs):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                          **kwargs)


def test_layer_library_imports_no_fairseq_and_patches_nothing():
    proc = python(NO_FAIRSEQ)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_unsupported_fairseq_version_is_refused_in_one_line():
    proc = python("import fairseq; fairseq.__version__ = '0.10.2'; import moe_fairseq.plugin")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "moe_fairseq: error: moe_fairseq patches fairseq 0.12.2 or 0.12.3.1, not fairseq 0.10.2: install "
        "fairseq==0.12.2 (Python < 3.11) or fairseq-fixed==0.12.3.1")


def test_supported_versions_pass_the_check():
    from moe_fairseq.fairseq_patches import SUPPORTED_FAIRSEQ_VERSIONS, check_fairseq_version

    for version in SUPPORTED_FAIRSEQ_VERSIONS:
        check_fairseq_version(version)
    import fairseq

    assert fairseq.__version__ in SUPPORTED_FAIRSEQ_VERSIONS


def test_any_part_of_the_plugin_registers_all_of_it_and_install_is_idempotent():
    import moe_fairseq.models  # noqa: F401  (a part: the model only, on its own)
    from fairseq import checkpoint_utils
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.distributed import utils as distributed_utils
    from fairseq.models import MODEL_REGISTRY, distributed_fairseq_model
    from fairseq.optim.fairseq_optimizer import FairseqOptimizer
    from fairseq.tasks import TASK_REGISTRY
    from fairseq import utils as fairseq_utils
    from fairseq.trainer import Trainer
    from moe_fairseq import fairseq_patches as fp

    assert "transformer_moe" in MODEL_REGISTRY and "translation_multi_moe" in TASK_REGISTRY
    assert "moe_label_smoothed_cross_entropy" in CRITERION_REGISTRY
    ddp = distributed_fairseq_model.DistributedDataParallel
    for _ in range(2):
        fp.install()
    patched = {"infer_init_method": distributed_utils.infer_init_method,
               "all_reduce_grads": FairseqOptimizer.all_reduce_grads,
               "save_checkpoint": checkpoint_utils.save_checkpoint,
               "load_checkpoint_to_cpu": checkpoint_utils.load_checkpoint_to_cpu,
               "trainer_load_checkpoint": Trainer.load_checkpoint,
               "clip_grad_norm_": fairseq_utils.clip_grad_norm_,
               "broadcast_object_slow": distributed_utils._broadcast_object_slow}
    for name, function in patched.items():
        assert function is getattr(fp, name), name
        assert fp._original[name] is not function, f"{name} wraps itself: installed twice"
    assert distributed_fairseq_model.DistributedDataParallel is ddp
    assert ddp.__bases__ == (torch.nn.parallel.DistributedDataParallel,)
    assert sys.excepthook._moe_fairseq


def test_fairseq_checkpoint_types_load_with_weights_only(tmp_path):
    from moe_fairseq import fairseq_patches

    fairseq_patches.install()
    import numpy as np

    torch.save({"args": argparse.Namespace(arch="transformer_moe_tiny"), "bleu": np.array([1.0, 2.0])},
               tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state["args"].arch == "transformer_moe_tiny"


def test_checkpoint_tools_read_fairseq_checkpoints_without_the_plugin(tmp_path):
    """The checkpoint library (reshard, prune, average, consolidate read through
    checkpoint.io.read_checkpoint) works in a process that never imported the plugin: it
    allowlists fairseq's checkpoint types itself."""
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(arch="transformer_moe_tiny")},
               tmp_path / "c.pt")
    code = ("import sys; from moe_fairseq.checkpoint.io import read_checkpoint; "
            "assert 'moe_fairseq.plugin' not in sys.modules; "
            f"print(read_checkpoint({str(tmp_path / 'c.pt')!r})['args'].arch)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "transformer_moe_tiny"


def test_torchrun_world_on_cpu_uses_gloo(monkeypatch):
    from moe_fairseq import fairseq_patches

    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", WORLD_SIZE="2", RANK="1",
                           LOCAL_RANK="1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = SimpleNamespace(distributed_init_method=None, distributed_backend="nccl")
    fairseq_patches.infer_init_method(cfg)
    assert (cfg.distributed_world_size, cfg.distributed_rank, cfg.device_id) == (2, 1, 0)
    assert (cfg.distributed_init_method, cfg.distributed_no_spawn, cfg.distributed_backend) == ("env://", True, "gloo")


def test_ddp_of_a_cpu_model_gets_no_device_ids(monkeypatch):
    from moe_fairseq.fairseq_patches import _cpu_ddp_class

    seen = {}

    class FakeDDP(torch.nn.Module):
        def __init__(self, module, device_ids=None, output_device=None, **kwargs):
            super().__init__()
            seen.update(device_ids=device_ids, output_device=output_device, **kwargs)

    _cpu_ddp_class(FakeDDP)(torch.nn.Linear(2, 2), device_ids=[0], output_device=0, broadcast_buffers=False)
    assert seen == {"device_ids": None, "output_device": None, "broadcast_buffers": False}


@pytest.mark.parametrize("backend,refused", [("pytorch_ddp", False), ("legacy_ddp", False), ("fully_sharded", True)])
def test_expert_parallel_ddp_ignore_list(backend, refused):
    from moe_fairseq.distributed.expert_parallel_training import prepare_expert_parallel
    from moe_fairseq.moe import MoEConfig, build_moe_layer
    from moe_fairseq.moe.errors import MoEUsageError

    class TwoRanks:  # a communicator as ExpertParallelComm looks to prepare_expert_parallel
        world_size, rank, num_experts, num_local_experts = 2, 0, 4, 2

        def local_expert_ids(self):
            return [0, 1]

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), build_moe_layer(MoEConfig(num_experts=4), 4, 8, comm=TwoRanks()))
    if refused:
        with pytest.raises(MoEUsageError, match=f"--ddp-backend {backend} cannot train expert-parallel"):
            prepare_expert_parallel(model, SimpleNamespace(ddp_backend=backend))
        return
    prepare_expert_parallel(model, SimpleNamespace(ddp_backend=backend))
    assert model._ddp_params_and_buffers_to_ignore == ["1.experts.w1", "1.experts.b1", "1.experts.w2", "1.experts.b2"]
