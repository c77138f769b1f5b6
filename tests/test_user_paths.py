"""User paths the other tests do not take: --encoder-moe-freq / --decoder-moe-freq, the
evaluation capacity override at generation, and beam search's hypothesis scores against
teacher-forced scoring of the same hypotheses (one full forward, no incremental state)."""
from argparse import Namespace

import pytest
import torch

import moe_fairseq.plugin  # noqa: F401  (allowlists the types fairseq checkpoints hold for torch.load)

from cli_helpers import generate_cmd, hypotheses, make_tiny_corpus, run, train_cmd
from moe_fairseq.moe.collect import moe_layers


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("paths_corpus"), n_train=200)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """Top-2 with per-stack MoE frequencies: both encoder layers MoE, every 2nd decoder layer."""
    save = tmp_path_factory.mktemp("paths_run")
    run(train_cmd(data, save, "--moe-router", "top2", "--encoder-moe-freq", "1", "--decoder-moe-freq", "2",
                  "--decoder-layers", "2", max_update=30))
    return save / "checkpoint_last.pt"


def load(checkpoint, data, **overrides):
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(data), "source_lang": "en", "target_lang": "de", **overrides})
    return models[0].eval(), task


def test_encoder_and_decoder_moe_freq(trained):
    keys = torch.load(trained)["model"].keys()
    moe = sorted({k.split(".moe.")[0] for k in keys if ".moe." in k})
    assert moe == ["decoder.layers.1.fc1", "encoder.layers.0.fc1", "encoder.layers.1.fc1"]
    assert "decoder.layers.0.fc1.weight" in keys and "decoder.layers.1.fc1.weight" not in keys


def test_eval_capacity_override(data, trained):
    """--model-overrides "{'moe_eval_capacity_factor': C}" reaches every router: a small C drops
    slots in evaluation and changes the hypotheses, a large one drops none."""
    x = torch.randn(40, 64)
    dropped = {}
    for cf in (0.25, 2.0, 100.0):
        model, _ = load(trained, data, moe_eval_capacity_factor=cf)
        layers = moe_layers(model)
        assert len(layers) == 3 and all(layer.router.eval_capacity_factor == cf for layer in layers)
        layer = layers[0]
        with torch.no_grad():
            layer(x, aux_mode="losses+stats")
        dropped[cf] = float(layer.aux.stats.dropped_by_capacity)
    assert dropped[0.25] > dropped[2.0] >= dropped[100.0] == 0
    default = hypotheses(run(generate_cmd(data, trained)).stdout)
    small = hypotheses(run(generate_cmd(data, trained, "--model-overrides", "{'moe_eval_capacity_factor': 0.25}")).stdout)
    assert len(default) == len(small) == 40 and default != small


def test_beam_scores_equal_teacher_forced_scores(data, trained, monkeypatch):
    """Every beam hypothesis's per-token log-probabilities (incremental decoding, the decoder
    MoE layer on moe/decode.py's few-rows path) equal a plain forward of the model over that
    hypothesis (teacher forcing, the general MoE path).  Dropless evaluation, so a token is routed
    alike in both, whatever the batch."""
    from moe_fairseq.moe import decode

    model, task = load(trained, data, moe_dropless=True)
    fast_calls = []
    few_rows_ffn = decode.few_rows_ffn
    monkeypatch.setattr(decode, "few_rows_ffn", lambda *a: fast_calls.append(1) or few_rows_ffn(*a))
    task.load_dataset("test")
    generator = task.build_generator([model], Namespace(beam=4, max_len_b=20))  # every finished beam
    batches = task.get_batch_iterator(task.dataset("test"), max_sentences=16).next_epoch_itr(shuffle=False)
    eos, checked, sentences = task.target_dictionary.eos(), 0, 0
    for sample in batches:
        for layer in moe_layers(model):
            layer.decode_fast_path = True
        hypos = task.inference_step(generator, [model], sample)
        for layer in moe_layers(model):
            layer.decode_fast_path = False  # the reference: the general path
        src, lengths = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
        sentences += len(hypos)
        for i, nbest in enumerate(hypos):
            for hypo in nbest:
                tokens = hypo["tokens"]
                prev = torch.cat([tokens.new_tensor([eos]), tokens[:-1]])
                with torch.no_grad():
                    logits = model(src[i:i + 1], lengths[i:i + 1], prev[None])[0]
                forced = torch.log_softmax(logits.float(), -1)[0].gather(-1, tokens[:, None])[:, 0]
                assert torch.allclose(hypo["positional_scores"], forced, atol=1e-4), \
                    (hypo["positional_scores"] - forced).abs().max()
                checked += 1
    assert sentences == 40 and checked == 4 * 40  # beam 4: four finished hypotheses per sentence
    assert fast_calls, "beam search never took the decoder-step path"
