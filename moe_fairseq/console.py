"""What every console script (moe-*) does first.

Importing fairseq imports fairscale, whose offload module calls torch.cuda.amp.custom_fwd /
custom_bwd at import time; torch deprecated those, so every command would start with four lines
of FutureWarning about code the user neither wrote nor can change. Only those warnings are
silenced, and only in the console scripts: a program that imports the plugin keeps its own
warning settings.
"""
import warnings


def quiet_third_party_warnings():
    """Call before fairseq is imported (filters match when a warning is issued)."""
    warnings.filterwarnings(
        "ignore", category=FutureWarning, module=r"fairscale\.",
        message=r"`torch\.cuda\.amp\.custom_(fwd|bwd)\(args\.\.\.\)` is deprecated")


def _run(module):
    """The console script's body: the filter first, then the module (which may import fairseq)."""
    import importlib

    quiet_third_party_warnings()
    return importlib.import_module(module).cli_main()


# the console scripts of setup.py
def consolidate():
    return _run("moe_fairseq.checkpoint.consolidate")


def reshard():
    return _run("moe_fairseq.checkpoint.reshard")


def prune():
    return _run("moe_fairseq.checkpoint.prune")


def average():
    return _run("moe_fairseq.checkpoint.average")


def evaluate():
    return _run("moe_fairseq.evaluate")


def prepare():
    return _run("data_prep.prepare")
