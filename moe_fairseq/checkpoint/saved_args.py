"""The arguments a checkpoint was trained with: the one reader of them for every tool.

fairseq 0.12 saves them as state["cfg"]["model"] and state["cfg"]["task"] (for this plugin's
legacy model and task each an argparse.Namespace of the whole command line, for dataclass
ones a dict), older fairseq as state["args"] (one Namespace).  fairseq reads every copy back,
so a tool that changes an argument changes each copy (moe-prune), and a tool that reads one
takes the first copy that holds it.
"""
from typing import List

from ..moe.errors import MoEUsageError


def arg(holder, name: str, default=None):
    """One argument of a saved copy (a dict or a Namespace; None holds nothing)."""
    if holder is None:
        return default
    return holder.get(name, default) if isinstance(holder, dict) else getattr(holder, name, default)


def as_list(value) -> List[str]:
    """A list argument as saved: a list in the task's copy, the command line's comma-separated
    string in the model's (e.g. --lang-pairs)."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]


class SavedArgs:
    """The saved copies of a checkpoint's arguments.

    model, task: the copies fairseq builds the model and the task from (the same Namespace in
    a checkpoint of older fairseq; None when the state holds no arguments)."""

    def __init__(self, state: dict):
        cfg = state.get("cfg") or {}
        legacy = state.get("args")
        if arg(cfg, "model") is not None:
            self.model, self.task = arg(cfg, "model"), arg(cfg, "task")
        else:
            self.model = self.task = legacy
        self._copies = [c for c in (arg(cfg, "model"), arg(cfg, "task"), legacy) if c is not None]

    def get(self, name: str, default=None):
        """The first copy's value of `name` that is not None."""
        return next((value for value in (arg(c, name) for c in self._copies) if value is not None), default)

    def set(self, **values):
        """Set each value in every copy (fairseq reads the model's and the task's copy back)."""
        for copy in self._copies:
            for name, value in values.items():
                if isinstance(copy, dict):
                    copy[name] = value
                else:
                    setattr(copy, name, value)

    @property
    def num_experts(self) -> int:
        """--moe-expert-count: experts per MoE layer, 0 for a dense model."""
        return int(self.get("moe_expert_count") or 0)

    @property
    def router(self) -> str:
        """--moe-router, aliases resolved (--moe-top1-expert wins over it)."""
        from ..moe.config import config_values  # torch: not for the scripts that only use arg and as_list

        return config_values(self.get)["router"]

    def moe_config(self):
        """The MoEConfig the checkpoint's MoE layers were built from (validated)."""
        from ..moe.config import MoEConfig, config_values

        if not self.num_experts:
            raise MoEUsageError("a dense checkpoint (moe_expert_count 0) has no MoE config")
        return MoEConfig(**config_values(self.get))


def saved_args(state: dict) -> SavedArgs:
    """The arguments saved in a checkpoint's state (as read_checkpoint returns it)."""
    return SavedArgs(state)


def read_saved_args(path: str, label: str = "checkpoint") -> SavedArgs:
    """The arguments saved in the checkpoint file `path`; `label` names the flag in errors."""
    from .io import read_checkpoint  # torch: not for the scripts that only use arg and as_list

    saved = SavedArgs(read_checkpoint(path, label))
    if saved.model is None:
        raise MoEUsageError(f"{label} {path} holds neither cfg nor args: not a fairseq checkpoint")
    return saved
