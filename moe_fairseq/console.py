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


def _entry(module):
    """A console script's body: the filter first, then the module (which may import fairseq)
    and its cli_main."""
    def main():
        import importlib

        quiet_third_party_warnings()
        return importlib.import_module(module).cli_main()

    main.__name__ = module.rsplit(".", 1)[-1]
    return main


# the console scripts of setup.py
consolidate = _entry("moe_fairseq.tools.consolidate")
reshard = _entry("moe_fairseq.tools.reshard")
prune = _entry("moe_fairseq.tools.prune")
average = _entry("moe_fairseq.tools.average")
evaluate = _entry("moe_fairseq.tools.evaluate")
prepare = _entry("data_prep.prepare")
quantize = _entry("moe_fairseq.tools.quantize")
