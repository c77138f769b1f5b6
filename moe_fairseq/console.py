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
