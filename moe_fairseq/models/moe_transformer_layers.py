"""fairseq transformer layers whose FFN sub-layer is a MoELayer.

fairseq's layer computes `fc2(activation_dropout(activation_fn(fc1(x))))` inline in forward();
rather than copying its forward (and drifting from fairseq), the MoE layer takes fc1's place
and fc2 / the activation become identities.  The only extra input a MoE layer needs, the
padding mask, is handed over just before fairseq's forward runs.

--checkpoint-activations / --offload-activations: fairseq wraps its dense layers in its own
checkpoint_wrapper, a reentrant checkpoint that runs the forward under no_grad.  That would be
wrong for a MoE layer: its aux losses are computed inside the layer and taken out beside the
output (MoELayer.aux), so under no_grad they would reach the loss without a gradient and the
router would silently stop learning to balance.  A MoE layer is checkpointed with torch's
non-reentrant checkpoint instead, where the forward keeps the autograd graph of everything it
returns (aux losses included) and only the saved activations are dropped and recomputed:
- torch saves and restores the RNG state (preserve_rng_state), so the recomputation draws the
  same Gumbel noise, jitter, random-policy coins and dropout masks, and routes identically;
  Gating Dropout is a pure function of (seed, update, layer), unchanged until the next update;
- the recomputation runs to the end (early_stop=False): each rank then makes exactly the
  forward's all-to-alls again, whatever tensors its own backward still needs;
- the recomputation runs with the forward's aux mode and its aux losses and statistics are
  discarded (the first forward's were already collected), so nothing is counted twice
  (MoELayer.recomputing).
"""
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase

from ..moe.layer import MoELayer


def _identity(x):
    return x


class MoEFeedForward(nn.Module):
    """Stands in for fc1: (T, B, C) -> MoE output, masking the padding of the current batch."""

    def __init__(self, moe: MoELayer):
        super().__init__()
        self.moe = moe
        self.padding_mask = None  # (B, T), True at padding; set by the owning layer per call

    def forward(self, x):
        mask = self.padding_mask
        if mask is not None:
            mask = mask.transpose(0, 1)
            if mask.shape != x.shape[:2]:  # e.g. incremental decoding: one position at a time
                mask = None
        return self.moe(x, mask)


def _install(layer, moe: MoELayer):
    layer.fc1 = MoEFeedForward(moe)
    layer.fc2 = nn.Identity()
    layer.activation_fn = _identity
    layer.activation_dropout_module = nn.Identity()  # experts apply their own (expert) dropout


class _MoELayerRunner:
    """Runs fairseq's forward with the padding mask handed to the MoE, checkpointed if asked."""

    def _init_checkpointing(self, cfg):
        # fairseq's build_model sets checkpoint_activations for offload too; a config built by
        # hand may not have, so offloading implies checkpointing here as well.
        self.offload_activations = bool(getattr(cfg, "offload_activations", False))
        self.checkpoint_activations = bool(getattr(cfg, "checkpoint_activations", False)) or self.offload_activations

    def _run(self, forward, padding_mask, x, *args, **kwargs):
        ffn = self.fc1

        def run(x, *args, **kwargs):
            ffn.padding_mask = padding_mask  # set inside: the recomputation in backward needs it too
            try:
                return forward(x, *args, **kwargs)
            finally:
                ffn.padding_mask = None

        if not (self.checkpoint_activations and self.training and torch.is_grad_enabled()):
            return run(x, *args, **kwargs)
        device, first = x.device, [True]
        aux_mode = ffn.moe.resolve_aux_mode()  # now: backward runs after the criterion's computing_aux block

        def checkpointed(x, *args, **kwargs):
            if self.offload_activations:
                x = x.to(device, non_blocking=True)
            if first[0]:
                first[0] = False
                return run(x, *args, **kwargs)
            with ffn.moe.recomputing(aux_mode):
                return run(x, *args, **kwargs)

        if self.offload_activations:
            # The layer's input is the one tensor the checkpoint keeps until backward (as
            # fairseq's offload_to_cpu does for its inputs); on a CPU model this is a no-op.
            x = x.to("cpu", non_blocking=True)
        return checkpoint(checkpointed, x, *args, use_reentrant=False, preserve_rng_state=True,
                          early_stop=False, **kwargs)


class MoETransformerEncoderLayer(_MoELayerRunner, TransformerEncoderLayerBase):
    def __init__(self, cfg, moe: MoELayer, return_fc=False):
        super().__init__(cfg, return_fc)
        _install(self, moe)
        self._init_checkpointing(cfg)

    def forward(self, x, encoder_padding_mask, attn_mask=None):
        return self._run(super().forward, encoder_padding_mask, x, encoder_padding_mask, attn_mask)


class MoETransformerDecoderLayer(_MoELayerRunner, TransformerDecoderLayerBase):
    def __init__(self, cfg, moe: MoELayer, no_encoder_attn=False):
        super().__init__(cfg, no_encoder_attn)
        _install(self, moe)
        self._init_checkpointing(cfg)

    def forward(self, x, *args, self_attn_padding_mask=None, **kwargs):
        return self._run(super().forward, self_attn_padding_mask, x, *args,
                         self_attn_padding_mask=self_attn_padding_mask, **kwargs)
