"""The offline programs: moe-evaluate, moe-prune, moe-average, moe-consolidate, moe-reshard,
moe-quantize and the expert-usage count; they read checkpoints through moe_fairseq.checkpoint."""
