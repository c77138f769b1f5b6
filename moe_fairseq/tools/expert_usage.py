"""Measure how many tokens each expert of each MoE layer receives, per translation direction.

Teacher-forced forward passes in evaluation mode over the first sentences of a data split,
one direction at a time; each MoE layer's `aux.stats.tokens_per_expert` (slots per expert: a
top-2 token counts twice; padding is never counted) is summed over the batches.  Used by
scripts/plot_expert_usage.py (usage plots), moe-prune (which experts to keep) and
scripts/bench_generate.py (the per-direction inference task).
"""
import argparse
import copy
import re
from pathlib import Path
from typing import Dict, List, Tuple

USER_DIR = str(Path(__file__).resolve().parents[1])  # the package: fairseq's --user-dir


def layer_label(name: str) -> str:
    """'encoder.layers.1.fc1.moe' -> 'encoder layer 1'."""
    m = re.search(r"(encoder|decoder)\.layers\.(\d+)", name)
    return f"{m.group(1)} layer {m.group(2)}" if m else name


def moe_layer_names(model) -> List[Tuple[str, "object"]]:
    """[(label, MoELayer)] in module order."""
    from ..moe.layer import MoELayer

    return [(layer_label(n), m) for n, m in model.named_modules() if isinstance(m, MoELayer)]


def load_model(path: str, data: str):
    """(model in eval mode on CPU, cfg) of a checkpoint, with its data path replaced by `data`.

    The saved --user-dir is replaced by this package's directory: fairseq refuses to import a
    second directory named moe_fairseq once this one is imported (and the saved one may be gone)."""
    from fairseq import checkpoint_utils

    # the model and task must be registered; patch 6 merges a sharded checkpoint's experts
    from .. import plugin  # noqa: F401

    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task(
        [str(path)], arg_overrides={"data": data, "user_dir": USER_DIR})
    return models[0].eval(), cfg


def direction_task(cfg, data: str, pair: str, split: str):
    """A per-direction inference task (as fairseq-generate builds it: --source-lang/--target-lang,
    so language tokens are exactly as in generation) with `split` loaded."""
    from fairseq import tasks
    from omegaconf import open_dict

    src, tgt = pair.split("-")
    task_cfg = copy.deepcopy(cfg.task)  # an argparse.Namespace for this (legacy) task
    overrides = dict(data=data, source_lang=src, target_lang=tgt, gen_subset=split)
    if isinstance(task_cfg, argparse.Namespace):
        vars(task_cfg).update(overrides)
    else:
        with open_dict(task_cfg):
            for key, value in overrides.items():
                setattr(task_cfg, key, value)
    task = tasks.setup_task(task_cfg)
    task.load_dataset(split)
    return task


def sentence_batches(dataset, sentences, batch_size: int) -> list:
    """Collated batches of `batch_size` of the first `sentences` sentences (None: all), in order."""
    n = len(dataset) if sentences is None else min(sentences, len(dataset))
    items = [dataset[i] for i in range(n)]
    return [dataset.collater(items[i:i + batch_size]) for i in range(0, n, batch_size)]


def direction_batches(cfg, data, pairs, split, sentences, batch_size) -> Dict[str, list]:
    """{direction: [batch, ...]}: the first `sentences` sentences (None: all) of each direction."""
    out = {}
    for pair in pairs:
        task = direction_task(cfg, data, pair, split)
        out[pair] = sentence_batches(task.dataset(split), sentences, batch_size)
    return out


def measure(model, batches, device) -> Dict[str, Dict[str, List[float]]]:
    """{layer: {direction: [tokens per expert]}} for one model on the fixed batches."""
    import torch
    from fairseq import utils

    from ..moe.aux_mode import AuxMode

    layers = moe_layer_names(model)
    for _, layer in layers:
        # the counts come from the layers' routing statistics: make sure they are collected
        layer.aux_mode = AuxMode.ALL
    counts = {label: {} for label, _ in layers}
    with torch.no_grad():
        for pair, pair_batches in batches.items():
            totals = [None] * len(layers)
            for batch in pair_batches:
                batch = utils.move_to_cuda(batch, device=device) if device.type == "cuda" else batch
                model(**batch["net_input"])
                for i, (_, layer) in enumerate(layers):
                    stats = layer.aux.stats
                    if stats is None:
                        continue
                    tpe = stats.tokens_per_expert.detach().double().cpu()
                    totals[i] = tpe if totals[i] is None else totals[i] + tpe
            for i, (label, _) in enumerate(layers):
                counts[label][pair] = totals[i].tolist() if totals[i] is not None else []
    return counts
