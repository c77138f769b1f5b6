from . import translation_multi_moe  # noqa: F401
