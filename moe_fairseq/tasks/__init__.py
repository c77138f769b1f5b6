from .. import plugin  # noqa: F401  (the whole plugin, whichever part is imported first: see plugin.py)
from . import translation_multi_moe  # noqa: F401,E402
