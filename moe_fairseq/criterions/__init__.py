from .. import plugin  # noqa: F401  (the whole plugin, whichever part is imported first: see plugin.py)
from . import moe_label_smoothed_cross_entropy  # noqa: F401,E402
