"""fairseq transformer layers whose FFN sub-layer is a MoELayer.

fairseq's layer computes `fc2(activation_dropout(activation_fn(fc1(x))))` inline in forward();
rather than copying its forward (and drifting from fairseq), the MoE layer takes fc1's place
and fc2 / the activation become identities.  The only extra input a MoE layer needs, the
padding mask, is handed over just before fairseq's forward runs.
"""
import torch.nn as nn
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


class MoETransformerEncoderLayer(TransformerEncoderLayerBase):
    def __init__(self, cfg, moe: MoELayer, return_fc=False):
        super().__init__(cfg, return_fc)
        _install(self, moe)

    def forward(self, x, encoder_padding_mask, attn_mask=None):
        self.fc1.padding_mask = encoder_padding_mask
        try:
            return super().forward(x, encoder_padding_mask, attn_mask)
        finally:
            self.fc1.padding_mask = None


class MoETransformerDecoderLayer(TransformerDecoderLayerBase):
    def __init__(self, cfg, moe: MoELayer, no_encoder_attn=False):
        super().__init__(cfg, no_encoder_attn)
        _install(self, moe)

    def forward(self, x, *args, self_attn_padding_mask=None, **kwargs):
        self.fc1.padding_mask = self_attn_padding_mask
        try:
            return super().forward(x, *args, self_attn_padding_mask=self_attn_padding_mask, **kwargs)
        finally:
            self.fc1.padding_mask = None
