"""fairseq-side set-up of expert-parallel training."""
