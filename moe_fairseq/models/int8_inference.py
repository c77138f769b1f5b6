"""int8 inference of fairseq transformer models: the plugin's transformer_moe and fairseq's own
transformer (as `transformer_int8`).

A checkpoint written by moe-quantize (tools/quantize.py) holds int8 weights with per-channel
scales (moe/int8.py) and says so in its saved model config: `moe_int8_inference = True`, and for
a plain fairseq transformer the architecture `transformer_int8`, registered here (loading one
therefore needs `--user-dir moe_fairseq`).  Either way the model is built as usual, its modules
are swapped for int8 ones by `to_int8_` before fairseq loads the state dict, and the strict load
then checks that every int8 tensor has its place.

What becomes int8 (`to_int8_`): every nn.Linear (attention projections, dense FFNs, the output
projection) and the token embeddings (one int8 copy serves the embedding and the output
projection tied to it), and every MoE layer's experts.  What stays fp32: routers (their
decision is a comparison of logits: an int8 error could flip it), layer norms, biases and
positional embeddings.
"""
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer.transformer_legacy import TransformerModel, base_architecture
from fairseq.modules import MultiheadAttention
from torch import nn

from ..moe.experts import FFNExperts
from ..moe.int8 import Int8Embedding, Int8FFNExperts, Int8Linear
from ..moe.routers import Router

INT8_FLAG = "moe_int8_inference"  # the saved model config's mark of an int8 checkpoint
INT8_ARCH = "transformer_int8"  # fairseq's transformer, int8


def _children(model: nn.Module):
    """(parent, attribute name, child) of every module below `model` outside routers, each
    (parent, name) once (a module shared by two parents appears under both)."""
    router_parts = {id(m) for r in model.modules() if isinstance(r, Router) for m in r.modules()}
    out = []
    for parent in model.modules():
        if id(parent) in router_parts:
            continue
        for name, child in parent.named_children():
            if id(child) not in router_parts:
                out.append((parent, name, child))
    return out


def to_int8_(model: nn.Module) -> nn.Module:
    """Swap `model`'s weight matrices for int8 ones (see the module docstring), in place, and
    return it.  Each module is quantized once, however many parents share it, and a Linear
    tied to an embedding's weight (fairseq's output projection) shares its int8 rows."""
    children = _children(model)
    new = {}  # id(old module) -> its int8 replacement
    by_weight = {}  # id(embedding weight) -> Int8Embedding, for the linears tied to it
    for _, name, child in children:
        if name == "embed_tokens" and type(child) is nn.Embedding and id(child) not in new:
            new[id(child)] = Int8Embedding.from_float(child)
            by_weight[id(child.weight)] = new[id(child)]
    for _, _, child in children:
        if id(child) in new:
            continue
        if isinstance(child, nn.Linear):
            tied = by_weight.get(id(child.weight))
            new[id(child)] = tied.tied_linear() if tied is not None and child.bias is None else Int8Linear.from_float(child)
        elif isinstance(child, FFNExperts):
            new[id(child)] = Int8FFNExperts.from_float(child)
    for parent, name, child in children:
        if id(child) in new:
            setattr(parent, name, new[id(child)])
    for module in model.modules():
        if isinstance(module, MultiheadAttention):
            # its fused path (torch's multi_head_attention_forward) reads q_proj.weight and the
            # others directly; this fairseq switch sends it through the projections' forward
            module.skip_embed_dim_check = True
    return model


@register_model(INT8_ARCH)
class TransformerInt8Model(TransformerModel):
    """fairseq's transformer with int8 weights, for inference (written by moe-quantize)."""

    @classmethod
    def build_model(cls, args, task):
        return to_int8_(super().build_model(args, task))


@register_model_architecture(INT8_ARCH, INT8_ARCH)
def transformer_int8(args):
    # the saved config of the quantized model carries every dimension; this only fills gaps
    base_architecture(args)
