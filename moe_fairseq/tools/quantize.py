"""moe-quantize: a checkpoint for CPU inference with int8 weights.

    moe-quantize checkpoint_best.pt model_int8.pt

Every weight matrix (experts, attention and output projections, dense FFNs, token
embeddings) becomes int8 with one fp32 scale per output channel; routers, layer norms and
biases stay fp32 (moe/int8.py, models/int8_inference.py).  The result loads like any
checkpoint in fairseq-generate, fairseq-interactive and moe-evaluate with `--user-dir
moe_fairseq`, for the plugin's transformer_moe and for fairseq's own transformer alike (the
latter becomes the plugin's `transformer_int8`).  It is for inference only, without optimizer
state.  An expert-sharded checkpoint is refused: moe-consolidate it first.
"""
import argparse
import copy
import os
import sys

import torch

from ..checkpoint.format import PARAM_NAMES, is_int8_state, read_pointer
from ..checkpoint.io import read_checkpoint
from ..checkpoint.sharded import atomic_save
from ..moe.errors import MoEUsageError

# Precision flags the saved config must not carry: an int8 model takes fp32 activations on CPU,
# and the model builder refuses --fp16 / --amp without a GPU.
HALF_PRECISION = ("fp16", "bf16", "amp", "memory_efficient_fp16", "memory_efficient_bf16")


class _VocabTask:
    """What a transformer's build_model reads of its task: the dictionaries, here only their
    sizes (the checkpoint's embeddings), so that quantizing needs no data directory."""

    def __init__(self, model_state: dict, shared: bool):
        from fairseq.data import Dictionary

        def sized(n):
            d = Dictionary()
            while len(d) < n:
                d.add_symbol(f"<{len(d)}>")
            return d

        self.source_dictionary = sized(model_state["encoder.embed_tokens.weight"].shape[0])
        self.target_dictionary = (self.source_dictionary if shared else
                                  sized(model_state["decoder.embed_tokens.weight"].shape[0]))


def model_args_of(state: dict, path: str):
    cfg = state.get("cfg")
    args = cfg.get("model") if cfg is not None else None
    if not isinstance(args, argparse.Namespace):
        raise MoEUsageError(f"{path} has no model configuration moe-quantize can read (fairseq 0.12 transformer "
                            f"checkpoints save cfg['model'] as an argparse.Namespace)")
    return args


def build_fp32(state: dict, path: str):
    """(model with the checkpoint's fp32 weights, its model args)."""
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY
    from fairseq.models.transformer.transformer_legacy import TransformerModel

    args = copy.deepcopy(model_args_of(state, path))
    arch = getattr(args, "_name", None) or getattr(args, "arch", None)
    model_cls = ARCH_MODEL_REGISTRY.get(arch)
    if model_cls is None or not issubclass(model_cls, TransformerModel):
        raise MoEUsageError(f"{path} is a {arch!r} model; moe-quantize takes fairseq's transformer and the "
                            f"plugin's transformer_moe architectures")
    for flag in HALF_PRECISION:
        if getattr(args, flag, False):
            setattr(args, flag, False)
    task = _VocabTask(state["model"], shared=getattr(args, "share_all_embeddings", False))
    ARCH_CONFIG_REGISTRY[arch](args)  # the architecture's defaults, as fairseq's models.build_model
    model = model_cls.build_model(args, task)
    model.load_state_dict(state["model"], strict=True, model_cfg=args)
    return model.eval(), args


def quantize(src: str, dst: str) -> dict:
    """Write the int8 checkpoint of `src` to `dst`; returns {fp32_mb, int8_mb, int8_tensors}."""
    from ..models.int8_inference import INT8_ARCH, INT8_FLAG, to_int8_
    from ..models.transformer_moe import TransformerMoEModel

    if os.path.abspath(src) == os.path.abspath(dst):
        raise MoEUsageError("the quantized checkpoint must not overwrite its source")
    state = read_checkpoint(src, "moe-quantize's input")
    if read_pointer(state, src) is not None:
        raise MoEUsageError(f"{src} is an expert-sharded checkpoint: make one file of it first "
                            f"(moe-consolidate {src} consolidated.pt), then quantize that")
    if is_int8_state(state["model"]):
        raise MoEUsageError(f"{src} is already an int8 checkpoint")
    model, args = build_fp32(state, src)
    fp32_bytes = _bytes(model.state_dict())
    to_int8_(model)
    setattr(args, INT8_FLAG, True)
    if not isinstance(model, TransformerMoEModel):
        args._name = args.arch = INT8_ARCH  # fairseq's transformer: the plugin's int8 twin loads it
    out = {k: v for k, v in state.items() if k != PARAM_NAMES}
    out["model"] = model.state_dict()
    out["last_optimizer_state"] = None  # inference only
    out["cfg"] = dict(state["cfg"], model=args)
    if isinstance(out.get("args"), argparse.Namespace):  # the legacy copy of the config, if any
        out["args"] = args
    atomic_save(out, dst)
    tensors = _unique(out["model"])
    return {"fp32_mb": fp32_bytes / 2 ** 20, "int8_mb": _bytes(out["model"]) / 2 ** 20,
            "int8_tensors": sum(1 for t in tensors if t.dtype == torch.int8)}


def _unique(state: dict):
    """The tensors of a state dict, each storage once (torch.save writes a tied weight once)."""
    return list({(t.untyped_storage().data_ptr(), t.storage_offset()): t for t in state.values()}.values())


def _bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in _unique(state))


def cli_main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Load it with --user-dir moe_fairseq (fairseq-generate, fairseq-interactive, "
                                       "moe-evaluate).")
    p.add_argument("checkpoint", help="a single-file fp32 checkpoint (moe-consolidate a sharded one first)")
    p.add_argument("output", help="path of the int8 checkpoint to write")
    args = p.parse_args(argv)
    from .. import plugin  # noqa: F401  (the plugin's model registered, its patches installed)

    try:
        info = quantize(args.checkpoint, args.output)
    except MoEUsageError as e:
        sys.exit(f"moe-quantize: error: {e}")
    size_in, size_out = os.path.getsize(args.checkpoint), os.path.getsize(args.output)
    print(f"wrote {args.output}: {info['int8_tensors']} int8 tensors; weights {info['int8_mb']:.1f} MB "
          f"(fp32: {info['fp32_mb']:.1f} MB); file {size_out / 2 ** 20:.1f} MB, "
          f"{100 * size_out / size_in:.0f}% of {args.checkpoint}")


if __name__ == "__main__":
    cli_main()
