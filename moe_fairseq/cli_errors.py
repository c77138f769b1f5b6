"""Print a bad option as one line (`moe_fairseq: error: ...`), not a deep traceback.

fairseq's command lines let exceptions from model/task construction escape with a full
traceback; for a mistake in the user's flags or files that buries the message.  Only
MoEUsageError is shortened: every other exception keeps its traceback.
"""
import sys

from .moe.errors import MoEUsageError


def install_excepthook():
    previous = sys.excepthook
    if getattr(previous, "_moe_fairseq", False):
        return

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, MoEUsageError):
            print(f"moe_fairseq: error: {exc}", file=sys.stderr)
            return
        previous(exc_type, exc, tb)

    hook._moe_fairseq = True
    sys.excepthook = hook
