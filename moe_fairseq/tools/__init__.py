"""Offline tools that read and write whole checkpoints (moe-quantize)."""
