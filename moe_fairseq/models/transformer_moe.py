"""`transformer_moe`: fairseq's transformer with chosen FFN sub-layers replaced by MoE layers.

With no MoE layers (--moe-expert-count 0 or --moe-freq 0) every module is fairseq's own, so a
dense baseline runs the very same code path and has exactly the transformer's parameters.
"""
import contextvars
import datetime
import logging
from dataclasses import dataclass
from typing import FrozenSet, Optional

import torch
import torch.distributed as dist
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig, TransformerDecoderBase, TransformerEncoderBase
from fairseq.models.transformer.transformer_legacy import (
    TransformerModel,
    base_architecture,
    transformer_vaswani_wmt_en_de_big,
)

from ..distributed.agreement import check_ranks_agree
from ..moe.config import MoEConfig, check_capacity_factor, check_eval_top_k
from ..moe.errors import MoEUsageError
from ..moe.layer import build_moe_layer
from .int8_inference import INT8_FLAG, to_int8_
from .moe_args import MoEModelOptions, add_moe_args, moe_config_from_args, set_moe_defaults
from .moe_transformer_layers import MoETransformerDecoderLayer, MoETransformerEncoderLayer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoEPlan:
    """What build_model decides once for the whole model, from flags checked once: the MoE
    config (None for a dense model), the model's options, and which layers are MoE."""

    config: Optional[MoEConfig]
    options: MoEModelOptions
    encoder_layers: FrozenSet[int]
    decoder_layers: FrozenSet[int]


def moe_plan(args) -> MoEPlan:
    """Every MoE flag checked, once, before anything is built: each error one line naming the flag
    and what is allowed."""
    num_experts = args.moe_expert_count
    options = MoEModelOptions.from_args(args).validate(num_experts, args.encoder_layers, args.decoder_layers)
    encoder_layers, decoder_layers = options.moe_layers(num_experts, args.encoder_layers, args.decoder_layers)
    config = None
    if num_experts:
        config = moe_config_from_args(args)  # validated when made
        if dist.is_available() and dist.is_initialized():
            config.check_world_size(dist.get_world_size())
    return MoEPlan(config, options, encoder_layers, decoder_layers)


# The plan of the model TransformerMoEModel.build_model is building: fairseq's build_model calls
# the build_encoder / build_decoder hooks with its config only, and they build the layers.
_BUILDING: contextvars.ContextVar = contextvars.ContextVar("moe_plan_of_the_model_being_built", default=None)


def _plan_of(cfg) -> MoEPlan:
    plan = _BUILDING.get()
    return plan if plan is not None else moe_plan(cfg)  # a hook called outside build_model


def build_comm(num_experts: int, timeout_seconds=None):
    """Expert parallelism over all ranks when a process group is up; single-process otherwise.
    The all-to-alls get a process group of their own (moe/expert_parallel.py), which like the
    replica groups waits timeout_seconds (--collective-timeout) for a peer."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from ..moe.expert_parallel import ExpertParallelComm, all_to_all_group

        timeout = datetime.timedelta(seconds=timeout_seconds) if timeout_seconds else None
        return ExpertParallelComm(num_experts, all_to_all_group(timeout), timeout)
    return None


def _build_moe(cfg, plan: MoEPlan, model_dim: int, ffn_dim: int, layer_index: int, timeout_seconds=None):
    hidden = plan.options.moe_expert_ffn_dim or ffn_dim
    return build_moe_layer(plan.config, model_dim, hidden, layer_index, cfg.activation_fn,
                           comm=build_comm(plan.config.num_experts, timeout_seconds),
                           split_hidden_dim=plan.options.moe_split_ffn)


class MoETransformerEncoder(TransformerEncoderBase):
    def __init__(self, cfg, dictionary, embed_tokens, plan: MoEPlan, return_fc=False, comm_timeout=None):
        # fairseq's constructor builds the layers (build_encoder_layer), one after the other
        # without passing the index: the MoE options and the layer count must be set first.
        self.moe_plan, self._moe_next_layer, self._comm_timeout = plan, 0, comm_timeout
        super().__init__(cfg, dictionary, embed_tokens, return_fc)

    def build_encoder_layer(self, cfg):
        index = self._moe_next_layer
        self._moe_next_layer = index + 1
        if index in self.moe_plan.encoder_layers:
            moe = _build_moe(cfg, self.moe_plan, cfg.encoder.embed_dim, cfg.encoder.ffn_embed_dim, index,
                             self._comm_timeout)
            return MoETransformerEncoderLayer(cfg, moe, return_fc=self.return_fc)
        return super().build_encoder_layer(cfg)


class MoETransformerDecoder(TransformerDecoderBase):
    def __init__(self, cfg, dictionary, embed_tokens, plan: MoEPlan, no_encoder_attn=False, comm_timeout=None):
        # before fairseq builds the layers: see the encoder
        self.moe_plan, self._moe_next_layer, self._comm_timeout = plan, 0, comm_timeout
        super().__init__(cfg, dictionary, embed_tokens, no_encoder_attn)

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        index = self._moe_next_layer
        self._moe_next_layer = index + 1
        if index in self.moe_plan.decoder_layers:
            # Decoder layers follow the encoder's in the gating-dropout key, so no two MoE
            # layers of the model share a drop decision.
            moe = _build_moe(cfg, self.moe_plan, cfg.decoder.embed_dim, cfg.decoder.ffn_embed_dim,
                             cfg.encoder.layers + index, self._comm_timeout)
            return MoETransformerDecoderLayer(cfg, moe, no_encoder_attn)
        return super().build_decoder_layer(cfg, no_encoder_attn)


@register_model("transformer_moe")
class TransformerMoEModel(TransformerModel):
    """Transformer with Mixture-of-Experts FFN sub-layers (see README for the flags)."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_moe_args(parser)

    @classmethod
    def build_model(cls, args, task):
        # The MoE flags' defaults are the architecture's (set_moe_defaults), which fairseq
        # applies before it calls this.  First, before anything a rank could fail at alone:
        # ranks given different flags would otherwise fail later with a shape error or hang in
        # an all-to-all.
        check_ranks_agree(args)
        plan = moe_plan(args)
        check_precision_flags(args)
        # The MoE config (moe_eval_top_k included) reaches every router when it is built; the
        # task applies its own --moe-eval-top-k (generation) afterwards.
        building = _BUILDING.set(plan)
        try:
            model = super().build_model(args, task)
        finally:
            _BUILDING.reset(building)
        if getattr(args, INT8_FLAG, False):  # a checkpoint written by moe-quantize
            to_int8_(model)
        from ..moe.collect import moe_layers

        checkpointed = [m for m in model.modules() if getattr(m, "checkpoint_activations", False)]
        if checkpointed:  # fairseq says nothing about checkpointing; say that MoE layers are included
            logger.info(f"activation checkpointing: {len(checkpointed)} MoE transformer layers checkpointed "
                        f"(non-reentrant, offload={checkpointed[0].offload_activations}) of "
                        f"{len(moe_layers(model))} MoE layers")
        return model

    @classmethod
    def build_encoder(cls, args, src_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(args)
        return MoETransformerEncoder(cfg, src_dict, embed_tokens, _plan_of(cfg),
                                     comm_timeout=getattr(args, "collective_timeout", None))

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(args)
        return MoETransformerDecoder(cfg, tgt_dict, embed_tokens, _plan_of(cfg),
                                     no_encoder_attn=cfg.no_cross_attention,
                                     comm_timeout=getattr(args, "collective_timeout", None))


# fairseq 0.12 trains in fp16 on CUDA only: without a GPU (or with --cpu) --fp16 moves tensors
# with .cuda() (and so does every fp16 overflow step, even --memory-efficient-fp16's), and
# --amp's autocast and loss scaler are CUDA's, which leave CPU tensors in fp32: a run that says
# it is mixed precision and is not.  The MoE layer itself computes in all these modes on CPU too
# (tests/test_precision.py); it is fairseq's trainer that cannot.  bf16 (--bf16,
# --memory-efficient-bf16) needs neither a loss scaler nor CUDA, and trains on any device once
# fairseq no longer mistakes it for TPU training (fairseq_patches.call_main).  Most specific
# flag first.
HALF_PRECISION_FLAGS = (("memory_efficient_fp16", "--memory-efficient-fp16"), ("amp", "--amp"), ("fp16", "--fp16"))


def check_precision_flags(args, cuda_available=None):
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if cuda_available and not getattr(args, "cpu", False):
        return
    for attr, flag in HALF_PRECISION_FLAGS:
        if getattr(args, attr, False):
            where = "--cpu is set" if getattr(args, "cpu", False) else "no CUDA GPU is available"
            raise MoEUsageError(f"{flag} needs a CUDA GPU with fairseq 0.12 ({where}): train in fp32 or "
                                f"with --bf16 on CPU")


def apply_eval_overrides(model, eval_top_k=None, eval_capacity_factor=None):
    """Set the evaluation-time k (self-slimmable inference) and capacity on every router."""
    from ..moe.collect import moe_layers

    for layer in moe_layers(model):
        if eval_top_k is not None:
            check_eval_top_k(type(layer.router), layer.router.num_experts, eval_top_k)
            layer.router.set_eval_k(eval_top_k)
        if eval_capacity_factor is not None:
            check_capacity_factor(eval_capacity_factor, "--moe-eval-capacity-factor")
            layer.router.eval_capacity_factor = eval_capacity_factor


def _moe_architecture(args, experts, freq):
    args.moe_expert_count = getattr(args, "moe_expert_count", None)
    if args.moe_expert_count is None:
        args.moe_expert_count = experts
    if getattr(args, "moe_freq", None) is None:
        args.moe_freq = freq
    set_moe_defaults(args)


@register_model_architecture("transformer_moe", "transformer_moe_tiny")
def transformer_moe_tiny(args):
    """Seconds per update on a CPU: for tests and the quickstart."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 64)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 128)
    args.encoder_layers = getattr(args, "encoder_layers", 2)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 2)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 2)
    _moe_architecture(args, experts=4, freq=2)
    base_architecture(args)


@register_model_architecture("transformer_moe", "transformer_moe_base")
def transformer_moe_base(args):
    """Transformer-base (512/2048, 6+6 layers); MoE in every other FFN, 8 experts."""
    _moe_architecture(args, experts=8, freq=2)
    base_architecture(args)


@register_model_architecture("transformer_moe", "transformer_moe_big")
def transformer_moe_big(args):
    """Transformer-big (1024/4096, 16 heads); MoE in every other FFN, 16 experts."""
    _moe_architecture(args, experts=16, freq=2)
    transformer_vaswani_wmt_en_de_big(args)
