"""--tensorboard-logdir: fairseq's TensorBoard writer receives the MoE statistics as scalars."""
import struct
from pathlib import Path

import pytest

from cli_helpers import make_tiny_corpus, run, train_cmd

MOE_SCALARS = {"moe_loss", "moe_balance_loss", "moe_load_cv", "moe_load_max_mean", "moe_overflow",
               "moe_gate_entropy", "moe_gating_dropped", "moe_a2a_mb"}


def scalar_tags(path: Path):
    """Tags of the scalars in one TensorBoard event file (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2

    data, i, tags = path.read_bytes(), 0, set()
    while i < len(data):
        n = struct.unpack("Q", data[i:i + 8])[0]
        event = event_pb2.Event()
        event.ParseFromString(data[i + 12:i + 12 + n])
        tags.update(v.tag for v in event.summary.value)
        i += 12 + n + 4
    return tags


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("tb_corpus"), n_train=100)


def test_moe_statistics_reach_tensorboard(data, tmp_path):
    logdir = tmp_path / "tb"
    run(train_cmd(data, tmp_path / "ckpt", "--moe-expert-count", "4", "--no-save", "--tensorboard-logdir", logdir,
                  "--moe-log-per-layer",
                  max_update=2))
    for split in ("train_inner", "valid"):
        files = list((logdir / split).glob("events.out.tfevents.*"))
        assert files, f"no {split} events"
        tags = set().union(*(scalar_tags(f) for f in files))
        assert MOE_SCALARS <= tags, f"{split}: missing {sorted(MOE_SCALARS - tags)}"
        assert "loss" in tags
        # --moe-log-per-layer: every MoE layer's own statistics, named after fairseq's layers
        # (transformer_moe_tiny: 2+2 layers, MoE in every other FFN, i.e. layers 1)
        assert {"moe_enc1_overflow", "moe_enc1_load_max_mean", "moe_dec1_gating_dropped", "moe_dec1_e3_load"} <= tags
