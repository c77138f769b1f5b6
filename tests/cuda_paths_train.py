"""fairseq-train with the checks fairseq 0.12 runs only on CUDA forced on the CPU, so that CPU
tests reproduce what a user's first multi-GPU run meets.  Run it where fairseq-train would run
(torchrun's script); with no MOE_FORCE_* variable set it is fairseq-train.

MOE_FORCE_GRAD_NORM_CHECK=1  Trainer._check_grad_norms compares the ranks' gradient norms (fairseq
                          allocates its buffer only when training on CUDA with several ranks)
MOE_FORCE_HALF_ON_CPU=1   --fp16 / --amp run on the CPU: the precision refusal of the plugin is
                          lifted, the flat fp32 master copy of FP16Optimizer is allowed off
                          CUDA (it asks torch.cuda.current_device() only for a dict key), and
                          --amp's loss scaler is torch's CPU GradScaler (fairseq makes CUDA's,
                          which disables itself without a GPU)
MOE_FORCE_OVERFLOW=R:U    on rank R, before the optimizer step of update U (1-based), the first
                          expert gradient is set to inf: an overflow in expert gradients on one
                          rank only, as fp16 produces it
MOE_REPORT=PATH           each rank appends one JSON line per update to PATH.RANK: the update,
                          the loss scale, and a checksum of the shared (non-expert) parameters
"""
import json
import os
import sys

import torch
import torch.distributed as dist


def _rank():
    return int(os.environ.get("RANK", 0))


def _install():
    from fairseq.trainer import Trainer

    if os.environ.get("MOE_FORCE_GRAD_NORM_CHECK"):
        init = Trainer.__init__

        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            if self.data_parallel_world_size > 1:
                self._grad_norm_buf = torch.zeros(self.data_parallel_world_size, dtype=torch.double)

        Trainer.__init__ = __init__

    if os.environ.get("MOE_FORCE_HALF_ON_CPU"):
        import moe_fairseq.models.transformer_moe as transformer_moe
        from fairseq.optim import amp_optimizer

        transformer_moe.check_precision_flags = lambda *args, **kwargs: None
        torch.cuda.current_device = lambda: 0
        amp_init = amp_optimizer.AMPOptimizer.__init__

        def amp_on_cpu(self, cfg, params, fp32_optimizer, **kwargs):
            amp_init(self, cfg, params, fp32_optimizer, **kwargs)
            self._grad_scaler = torch.amp.GradScaler("cpu", init_scale=cfg.common.fp16_init_scale,
                                                     growth_interval=cfg.common.fp16_scale_window)

        amp_optimizer.AMPOptimizer.__init__ = amp_on_cpu

    overflow = os.environ.get("MOE_FORCE_OVERFLOW")
    report = os.environ.get("MOE_REPORT")
    if overflow or report:
        clip = Trainer.clip_grad_norm
        step = Trainer.train_step

        def clip_grad_norm(self, clip_norm):
            if overflow:
                rank, update = (int(v) for v in overflow.split(":"))
                if _rank() == rank and self.get_num_updates() + 1 == update:
                    expert = [p for p in self.model.parameters() if hasattr(p, "expert") and p.grad is not None]
                    expert[0].grad.view(-1)[0] = float("inf")
            return clip(self, clip_norm)

        def train_step(self, samples, raise_oom=False):
            out = step(self, samples, raise_oom)
            if report:
                shared = sum(float(p.detach().double().sum()) for p in self.model.parameters()
                             if not hasattr(p, "expert"))
                scaler = getattr(self.optimizer, "scaler", None)
                scale = None
                if scaler is not None:
                    scale = float(scaler.get_scale()) if hasattr(scaler, "get_scale") else scaler.loss_scale
                with open(f"{report}.{_rank()}", "a") as f:
                    f.write(json.dumps({"update": self.get_num_updates(), "scale": scale, "shared": shared}) + "\n")
            return out

        Trainer.clip_grad_norm = clip_grad_norm
        Trainer.train_step = train_step


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import moe_fairseq.plugin  # noqa: F401  the patches first, as --user-dir would install them

    _install()
    from fairseq_cli.train import cli_main

    sys.argv[0] = "fairseq-train"
    cli_main()
