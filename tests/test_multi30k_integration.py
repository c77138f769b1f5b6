"""Integration on real data: Multi30k (../shared/data/multi30k), en -> de, fr, cs.

A few hundred updates of transformer_moe_tiny must bring the validation loss clearly below
where it starts.  Skipped, with the reason, when the corpus is not beside the checkout.
"""
import re
import sys
from pathlib import Path

import pytest

from cli_helpers import REPO, run, train_cmd

MULTI30K = REPO.parent / "shared" / "data" / "multi30k"

pytestmark = pytest.mark.skipif(not (MULTI30K / "train.en.gz").exists(),
                                reason=f"Multi30k not found at {MULTI30K} (it is never downloaded by tests)")


def test_moe_tiny_learns_multi30k(tmp_path):
    dest = tmp_path / "data-bin"
    run([sys.executable, "-m", "data_prep.prepare_multi30k", "--raw-dir", MULTI30K, "--destdir", dest,
         "--directions", "en-de,en-fr,en-cs", "--vocab-size", "2000", "--max-train-sentences", "6000",
         "--workers", "1"])
    cmd = train_cmd(dest, tmp_path / "ckpt", "--moe-router", "top2", "--moe-gating-dropout", "0.2",
                    "--encoder-embed-dim", "128", "--encoder-ffn-embed-dim", "256", "--share-all-embeddings",
                    "--max-tokens", "3000", "--lr", "0.002", "--lr-scheduler", "inverse_sqrt",
                    "--warmup-updates", "50", "--validate-interval-updates", "25", "--disable-validation",
                    max_update=250, targets=("de", "fr", "cs"))
    cmd.remove("--disable-validation")
    log = run(cmd).stdout
    valid = [float(v) for v in re.findall(r"valid on 'valid' subset \| loss ([0-9.]+)", log)]
    assert len(valid) >= 3, log[-2000:]
    # loss is in bits per token: ~log2(2000) = 11 for an untrained model
    assert valid[-1] < valid[0] - 1.5, valid
    assert valid[-1] < 7.0, valid
