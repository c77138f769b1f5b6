"""Expert-sharded checkpoints: fairseq hooks, consolidation and resharding."""
