from .. import plugin  # noqa: F401  (the whole plugin, whichever part is imported first: see plugin.py)
from . import transformer_moe  # noqa: F401,E402  (registers the model and its architectures)
from . import int8_inference  # noqa: F401,E402  (registers transformer_int8: fairseq's transformer, int8)
