"""--checkpoint-activations / --offload-activations through MoE transformer layers.

Reference: the same layer (a deep copy) without checkpointing, run from the same seed.  The
recomputation in backward must reproduce the forward exactly (same RNG draws, same routing,
same Gating Dropout decision), so gradients are compared for equality, with dropout off and on.
"""
import copy

import pytest
import torch
from fairseq.models.transformer import TransformerConfig

from moe_fairseq.models.moe_transformer_layers import MoETransformerDecoderLayer, MoETransformerEncoderLayer
from moe_fairseq.moe import MoEConfig, build_moe_layer
from moe_fairseq.moe.aux_mode import AuxMode
from moe_fairseq.moe.collect import pop_aux
from moe_fairseq.moe.gating_dropout import gating_dropout_fires

pytestmark = pytest.mark.usefixtures("one_thread")

C, FFN, T, S, B = 8, 16, 5, 4, 3
ROUTERS = [dict(router="top1", jitter_eps=0.1, z_loss_weight=1e-3), dict(router="top2", second_expert_policy="sampling"),
           dict(router="top2", second_expert_policy="random"), dict(router="noisy_topk"),
           dict(router="random", top_k_min=1, top_k_max=3, top_k_schedule_steps=10),
           dict(router="top2", gating_dropout=0.5, gating_dropout_mode="gate_drop"),
           dict(router="top2", gating_dropout=0.5, gating_dropout_mode="gate_expert_drop"),
           dict(router="top2", gating_dropout=0.5, gating_dropout_mode="local_topk")]
IDS = ["top1_jitter", "top2_sampling", "top2_random", "noisy_topk", "random", "gate_drop", "gate_expert_drop",
       "local_topk"]


def make_cfg(dropout):
    cfg = TransformerConfig()
    for side in (cfg.encoder, cfg.decoder):
        side.embed_dim, side.ffn_embed_dim, side.attention_heads = C, FFN, 2
    cfg.dropout = cfg.attention_dropout = dropout
    return cfg


def make_layer(kind, router_kw, dropout, checkpoint, offload=False):
    torch.manual_seed(0)
    cfg = make_cfg(dropout)
    cfg.checkpoint_activations, cfg.offload_activations = checkpoint and not offload, offload
    moe_cfg = MoEConfig(num_experts=4, expert_dropout=0.2 if dropout else 0.0, **router_kw)
    moe = build_moe_layer(moe_cfg, C, FFN)
    layer = MoETransformerEncoderLayer(cfg, moe) if kind == "encoder" else MoETransformerDecoderLayer(cfg, moe)
    if moe.gating_dropout:
        moe.set_num_updates(next(u for u in range(100) if gating_dropout_fires(0.5, moe.seed, u, 0)))
    else:
        moe.set_num_updates(4)
    return layer.train()


def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, C, generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 3:] = mask[2, 4:] = True
    enc = torch.randn(S, B, C, generator=g)
    enc_mask = torch.zeros(B, S, dtype=torch.bool)
    enc_mask[1, 3:] = True
    return x, mask, enc, enc_mask, torch.randn(T, B, C, generator=g)


def train_step(layer, seed=5):
    """Forward, collect the aux losses as the criterion does (pop_aux), backward."""
    x, mask, enc, enc_mask, target = inputs()
    x.requires_grad_(True)
    calls = []
    hook = layer.fc1.moe.router.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(seed)
    if isinstance(layer, MoETransformerEncoderLayer):
        out = layer(x, mask)
    else:
        out = layer(x, enc, enc_mask, self_attn_padding_mask=mask)[0]
    losses, stats = pop_aux(layer)
    loss = (out * target).sum() + 10 * sum(v for d in losses for v in d.values())
    torch.manual_seed(99)  # backward must not depend on the RNG state it starts from
    loss.backward()
    hook.remove()
    grads = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters() if p.grad is not None}}
    return out.detach(), losses, stats, grads, len(calls), layer.fc1.moe.aux


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("router_kw", ROUTERS, ids=IDS)
def test_checkpointed_encoder_layer_equals_plain(router_kw, dropout):
    plain = make_layer("encoder", router_kw, dropout, checkpoint=False)
    ckpt = make_layer("encoder", router_kw, dropout, checkpoint=True)
    out, losses, stats, grads, calls, left = train_step(plain)
    c_out, c_losses, c_stats, c_grads, c_calls, c_left = train_step(ckpt)
    # local_topk's dropped step still runs the (restricted) router; the other modes' do not
    routes = not ckpt.fc1.moe.gating_dropped() or ckpt.fc1.moe.gating_dropout_mode == "local_topk"
    assert (calls, c_calls) == ((1, 2) if routes else (0, 0))  # the router ran again in backward
    assert torch.equal(out, c_out)
    assert grads.keys() == c_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], c_grads[name]), name
    # Counted once: the criterion got the forward's losses and statistics, the recomputation
    # left nothing behind for the next step.
    assert len(c_losses) == len(c_stats) == 1
    assert c_losses[0].keys() == losses[0].keys()
    for name in losses[0]:
        assert torch.equal(losses[0][name], c_losses[0][name])
        assert losses[0][name].grad_fn is not None and c_losses[0][name].grad_fn is not None
    assert torch.equal(stats[0].tokens_per_expert, c_stats[0].tokens_per_expert)
    assert not c_left.losses and c_left.stats is None


@pytest.mark.parametrize("offload", [False, True], ids=["checkpoint", "offload"])
def test_checkpointed_decoder_layer_equals_plain(offload):
    kw = dict(router="top2", second_expert_policy="sampling", jitter_eps=0.1)
    _, _, _, grads, _, _ = train_step(make_layer("decoder", kw, 0.2, checkpoint=False))
    _, _, _, c_grads, c_calls, c_left = train_step(make_layer("decoder", kw, 0.2, checkpoint=True, offload=offload))
    assert c_calls == 2
    for name in grads:
        assert torch.equal(grads[name], c_grads[name]), name
    assert not c_left.losses and c_left.stats is None


@pytest.mark.parametrize("router_kw", [dict(router="noisy_topk"), dict(router="random", top_k_max=2)],
                         ids=["noisy_topk", "random"])
def test_recomputation_runs_in_the_forwards_aux_mode(router_kw):
    """A forward inside computing_aux(LOSSES) (no statistics, so these routers skip the softmax
    kept for them) is recomputed in backward after the block has closed: in the forward's mode,
    or it would save other tensors than the forward did (torch refuses the mismatch); gradients
    equal the plain layer's."""
    from moe_fairseq.moe.collect import computing_aux

    grads = {}
    for checkpointed in (False, True):
        layer = make_layer("encoder", router_kw, 0.0, checkpoint=checkpointed)
        x, mask, *_ = inputs()
        with computing_aux(layer, AuxMode.LOSSES):
            out = layer(x, mask)
        assert layer.fc1.moe.aux.stats is None
        out.pow(2).sum().backward()
        assert layer.fc1.moe.aux_mode is None and layer.fc1.moe.aux.stats is None  # restored, kept
        grads[checkpointed] = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    assert grads[False].keys() == grads[True].keys()
    for name in grads[False]:
        assert torch.equal(grads[False][name], grads[True][name]), name


def test_no_checkpointing_without_grad():
    """Evaluation and generation (no_grad): no checkpoint, one router call, aux kept when
    asked for (validation), none computed otherwise (generation)."""
    layer = make_layer("encoder", dict(router="top2"), 0.0, checkpoint=True).eval()
    x, mask, *_ = inputs()
    with torch.no_grad():
        layer(x, mask)
    assert layer.fc1.moe.aux.stats is None and not layer.fc1.moe.aux.losses
    layer.fc1.moe.aux_mode = AuxMode.ALL
    with torch.no_grad():
        layer(x, mask)
    assert layer.fc1.moe.aux.stats is not None and "balance" in layer.fc1.moe.aux.losses


def test_same_seed_same_gradients_with_dropout():
    kw = dict(router="top2", second_expert_policy="random", jitter_eps=0.1)
    a = train_step(make_layer("encoder", kw, 0.2, checkpoint=True), seed=3)[3]
    b = train_step(make_layer("encoder", kw, 0.2, checkpoint=True), seed=3)[3]
    c = train_step(make_layer("encoder", kw, 0.2, checkpoint=True), seed=4)[3]
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)  # the seed matters: dropout is on


def test_expert_parallel_two_gloo_ranks():
    """Dropout off and on, 2 processes, 2 experts each (tests/ep_worker.py: checkpointing)."""
    from test_expert_parallel import spawn

    spawn(2, ("checkpointing", dict(num_experts=4)), ("checkpointing", dict(num_experts=4, dropout=0.2)))
