"""moe-fairseq: Mixture-of-Experts layers, routers and regularisers for fairseq translation.

`fairseq-train --user-dir moe_fairseq` imports this package, which registers the models,
criterion and task with fairseq.  The layer library in `moe_fairseq.moe` needs only torch.
"""
try:
    import fairseq  # noqa: F401
except ImportError:  # the layer library stays usable without fairseq
    fairseq = None

if fairseq is not None:
    from . import compat  # noqa: F401  (torch.load allowlist and CPU torchrun fix; before anything loads)
    from .cli_errors import install_excepthook

    install_excepthook()
    from .checkpoint import fairseq_hooks

    fairseq_hooks.install()
    from .distributed import expert_parallel_training

    expert_parallel_training.install()
    from . import criterions, models, tasks  # noqa: F401
