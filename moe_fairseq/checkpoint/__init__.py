"""Checkpoint files without fairseq: the format of expert-sharded checkpoints (format.py), their
reading, merging and slicing (sharded.py), reading a file with one-line errors (io.py) and the
arguments a checkpoint was trained with (saved_args.py).  The programs are in moe_fairseq.tools."""
