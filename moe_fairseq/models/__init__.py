from . import transformer_moe  # noqa: F401  (registers the model and its architectures)
