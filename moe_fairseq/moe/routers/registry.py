"""Routers by name.  A router file registers its class with `@register_router("name")`, and the
class builds itself from a MoEConfig (`from_config`): adding a router is adding one file (and
importing it, in routers/__init__.py for the built-in ones).  `--moe-router` accepts every
registered name."""
from typing import Dict

ROUTERS: Dict[str, type] = {}  # name -> Router subclass, in registration order


def register_router(name: str):
    def register(cls):
        if name in ROUTERS:
            raise ValueError(f"router {name!r} is already registered (by {ROUTERS[name].__name__})")
        cls.name = name
        ROUTERS[name] = cls
        return cls

    return register


def build_router(cfg, model_dim: int):
    """The router `cfg.router` for tokens of size model_dim, with the evaluation-time k set."""
    router = ROUTERS[cfg.router].from_config(cfg, model_dim)
    if cfg.eval_top_k is not None:
        router.set_eval_k(cfg.eval_top_k)
    return router
