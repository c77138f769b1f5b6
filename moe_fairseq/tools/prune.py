"""moe-prune: language-specific expert pruning of a consolidated MoE checkpoint.

    moe-prune CKPT --data DATA_BIN --lang-pairs en-de,en-fr [--per target|pair] --keep N --out DIR

Shrinks a trained model for deployment on some directions, as Koishekenov et al. (2023) did
for NLLB-200's MoE: most experts are rarely used by one language, so keeping the few it uses
costs little BLEU and most of the memory.

Measuring.  CKPT runs teacher-forced in evaluation mode on the --split (valid) data of every
direction (moe_fairseq.tools.expert_usage, the code behind scripts/plot_expert_usage.py), and each
MoE layer counts the slots the router gives each expert: a top-2 token counts twice; capacity
is switched off while measuring, so the router's own choices are counted, not what a batch's
capacity happened to leave; padding is never counted.

Selection rule.  For each group of directions (--per target: all given directions into one
target language; --per pair: each direction alone) and each MoE layer, the counts are summed
over the group's directions and the N experts with the largest routed share are kept; ties go
to the lower expert id.  The kept experts keep their original order.

Writing.  One ordinary consolidated checkpoint per group, DIR/{group}.keep{N}.pt (group = the
target language, e.g. de.keep2.pt, or the direction, e.g. en-de.keep2.pt), with N experts in
every MoE layer: each kept expert's weights and its router rows (top1/top2's `wg`, noisy_topk's
`w_gate` and `w_noise`, the random router's frozen `weight` buffer), in the same order, and
--moe-expert-count N in its saved args; the optimizer state is dropped.  Plain
`fairseq-generate --user-dir moe_fairseq` loads it on one device, and `moe-evaluate` scores it.
DIR/usage.{per}.keep{N}.json records every count, share and kept id.  All files are written
to a staging directory first and moved into DIR only once every one is complete.

Router changes that N forces (also printed):
- top2 with N = 1 becomes top1 (there is no second expert); with one expert its gate is 1,
  which is what top2's renormalised gate would be.
- noisy_topk: k (--moe-top-k, and a saved --moe-eval-top-k) becomes min(k, N).
- random (SMoE-Dropout): --moe-top-k-max / -min and a saved --moe-eval-top-k become at most N.
  At the default evaluation k = E every expert gets every token, so the counts tie and the
  rule keeps the lowest ids: measure at a smaller k with --moe-eval-top-k.
- --moe-split-ffn (experts of FFN/E) is replaced by --moe-expert-ffn-dim FFN/E of the original
  E, since the expert size must not change with N.
Gates that are renormalised over the chosen experts (top2, noisy_topk, random) are unchanged
for every token whose chosen experts are all kept; top1's gate is the router probability,
which after pruning is a softmax over the kept experts only, so it grows a little.
The capacity factor stays relative: C = k * ceil(cf * S / N).

A sharded checkpoint is refused: run `moe-consolidate CKPT model.pt` first.
"""
import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
from typing import Dict, List, Optional

import torch

from ..checkpoint.format import POINTER, is_expert_key, moe_layer_names, refuse_int8, router_tensor
from ..checkpoint.io import read_checkpoint
from ..checkpoint.saved_args import as_list, saved_args
from ..checkpoint.sharded import atomic_save
from ..moe.config import field_dest
from ..moe.errors import MoEUsageError
from ..moe.routers import ROUTERS

PER = ("target", "pair")


def read_consolidated(path: str) -> dict:
    """The checkpoint's state, refusing what cannot be pruned, each with a one-line reason."""
    state = read_checkpoint(path)
    refuse_int8(state, path, "moe-prune")
    if POINTER in state:
        raise MoEUsageError(f"{path} is expert-sharded (its experts are in {state[POINTER]['dir']}): run "
                            f"`moe-consolidate {path} model.pt` first and prune model.pt")
    if not saved_args(state).num_experts:
        raise MoEUsageError(f"{path} has no MoE layers (moe_expert_count is 0): nothing to prune")
    return state


def check_keep(keep: int, num_experts: int):
    if not 1 <= keep <= num_experts:
        raise MoEUsageError(f"--keep must be between 1 and the checkpoint's --moe-expert-count={num_experts} "
                            f"(got {keep})")


def router_changes(state: dict, keep: int) -> Dict[str, object]:
    """Saved arguments that must change for N = keep experts (see the module docstring): the
    router's answer (Router.config_for_experts), and the expert size."""
    saved = saved_args(state)
    cfg = saved.moe_config()
    changes = {field_dest(name): value for name, value in ROUTERS[cfg.router].config_for_experts(cfg, keep).items()}
    if saved.get("moe_split_ffn", False):
        hidden = {tuple(state["model"][layer + ".experts.w1"].shape)[2] for layer in moe_layer_names(state["model"])}
        if len(hidden) != 1:
            raise MoEUsageError(f"--moe-split-ffn with expert sizes {sorted(hidden)} in encoder and decoder cannot "
                                f"be written with a single --moe-expert-ffn-dim: not supported")
        changes.update(moe_split_ffn=False, moe_expert_ffn_dim=hidden.pop())
    return changes


moe_layer_prefixes = moe_layer_names  # the name scripts/prune_table.py imports


def select_experts(counts: List[float], keep: int) -> List[int]:
    """The rule: the `keep` largest counts, ties to the lower id; returned in expert order."""
    ranked = sorted(range(len(counts)), key=lambda e: (-counts[e], e))
    return sorted(ranked[:keep])


def prune_state(state: dict, kept: Dict[str, List[int]], changes: Dict[str, object], meta: dict) -> dict:
    """A new checkpoint state with only the kept experts of each layer (prefix -> expert ids).

    Tensors that do not depend on the experts are shared with `state`, not copied."""
    saved = saved_args(state)
    num_experts, router = saved.num_experts, ROUTERS[saved.router]
    keep = len(next(iter(kept.values())))
    model = {}
    for name, tensor in state["model"].items():
        prefix = next((p for p in kept if name.startswith(p + ".")), None)
        if prefix is None:
            model[name] = tensor
            continue
        router_name = router_tensor(prefix, name)
        if not is_expert_key(name) and router_name is None:
            raise MoEUsageError(f"tensor {name} of a MoE layer is neither an expert weight nor a router row: "
                                f"moe-prune does not know how to prune it")
        if tensor.dim() == 0 or tensor.shape[0] != num_experts:
            raise MoEUsageError(f"tensor {name} has leading size {tuple(tensor.shape)[:1]}, expected one row per "
                                f"expert ({num_experts})")
        index = torch.tensor(kept[prefix])
        rows = tensor.index_select(0, index) if router_name is None else router.rows_of_experts(router_name, tensor,
                                                                                                 index)
        model[name] = rows.clone()
    missing = [p for p in kept if not any(n.startswith(p + ".") for n in model)]
    if missing:
        raise MoEUsageError(f"no MoE layer {missing[0]} in the checkpoint")
    out = {k: v for k, v in state.items() if k not in ("model", "cfg", "args", "last_optimizer_state")}
    out["model"] = model
    out["cfg"] = copy.deepcopy(state.get("cfg"))
    out["args"] = copy.deepcopy(state.get("args"))
    # the optimizer's moments belong to the unpruned experts; an inference checkpoint needs none
    out["last_optimizer_state"] = None
    saved_args(out).set(moe_expert_count=keep, **changes)
    out["moe_pruned"] = meta
    return out


def groups_of(pairs: List[str], per: str) -> Dict[str, List[str]]:
    if per == "pair":
        return {pair: [pair] for pair in pairs}
    groups: Dict[str, List[str]] = {}
    for pair in pairs:
        groups.setdefault(pair.split("-")[1], []).append(pair)
    return groups


def parse_pairs(text: str) -> List[str]:
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in pairs if len(p.split("-")) != 2 or not all(p.split("-"))]
    if not pairs or bad:
        raise MoEUsageError(f"--lang-pairs must be directions like en-de,en-fr (got {text!r})")
    if len(set(pairs)) != len(pairs):
        raise MoEUsageError(f"--lang-pairs lists a direction twice ({text})")
    return pairs


def check_directions(state: dict, data: str, pairs: List[str], split: str):
    """Every direction's languages are the checkpoint's and its --split data exists."""
    from ..tasks.translation_multi_moe import check_data_dir

    saved = saved_args(state)
    langs = set(as_list(saved.get("langs")))
    langs |= {lang for pair in as_list(saved.get("lang_pairs")) for lang in pair.split("-")}
    for pair in pairs:
        unknown = [lang for lang in pair.split("-") if langs and lang not in langs]
        if unknown:
            raise MoEUsageError(f"--lang-pairs {pair}: the checkpoint knows no language {unknown[0]} "
                                f"(its languages: {', '.join(sorted(langs))})")
        src, tgt = pair.split("-")
        check_data_dir(argparse.Namespace(data=data, source_lang=src, target_lang=tgt, gen_subset=split,
                                          lang_pairs=pairs))


def measure_counts(path: str, data: str, pairs: List[str], split: str, sentences: Optional[int],
                   batch_size: int, eval_top_k: Optional[int]) -> Dict[str, Dict[str, List[float]]]:
    """{layer prefix: {direction: [slots per expert]}}, capacity off (the router's choices)."""
    from ..models.transformer_moe import apply_eval_overrides
    from ..moe.collect import moe_layers
    from .expert_usage import direction_batches, layer_label, load_model, measure

    model, cfg = load_model(path, data)
    apply_eval_overrides(model, eval_top_k)
    for layer in moe_layers(model):
        layer.router.eval_capacity_factor = None  # count what the router chose, not what capacity left
    batches = direction_batches(cfg, data, pairs, split, sentences, batch_size)
    by_label = measure(model, batches, torch.device("cpu"))
    prefixes = {layer_label(p): p for p in moe_layer_names(model.state_dict())}
    return {prefixes[label]: per_pair for label, per_pair in by_label.items()}


def prune(checkpoint: str, data: str, lang_pairs: str, keep: int, out_dir: str, per: str = "target",
          split: str = "valid", sentences: Optional[int] = None, batch_size: int = 64,
          eval_top_k: Optional[int] = None, log=print) -> dict:
    """Measure, select and write (see the module docstring); returns the report."""
    if per not in PER:
        raise MoEUsageError(f"--per must be one of {', '.join(PER)} (got {per!r})")
    pairs = parse_pairs(lang_pairs)
    state = read_consolidated(checkpoint)
    num_experts, router = saved_args(state).num_experts, saved_args(state).router
    check_keep(keep, num_experts)
    if eval_top_k is not None and not ROUTERS[router].variable_k:
        names = [name for name, cls in ROUTERS.items() if cls.variable_k]
        raise MoEUsageError(f"--moe-eval-top-k applies to the {' and '.join(names)} routers, not {router}")
    changes = router_changes(state, keep)
    check_directions(state, data, pairs, split)
    groups = groups_of(pairs, per)
    names = {group: f"{group}.keep{keep}.pt" for group in groups}
    if any(os.path.abspath(os.path.join(out_dir, n)) == os.path.abspath(checkpoint) for n in names.values()):
        raise MoEUsageError(f"--out {out_dir} would overwrite the checkpoint {checkpoint}")

    counts = measure_counts(checkpoint, data, pairs, split, sentences, batch_size, eval_top_k)
    report = {"checkpoint": os.path.abspath(checkpoint), "data": data, "split": split,
              "sentences_per_direction": sentences, "per": per, "keep": keep, "experts": num_experts,
              "router": router, "changes": changes,
              "rule": "per layer, the N experts with the largest routed share (slots, capacity off) summed over "
                      "the group's directions; ties to the lower expert id; kept in expert order",
              "groups": {}}
    outputs = {}
    for group, group_pairs in groups.items():
        kept, layers = {}, {}
        for prefix, per_pair in counts.items():
            total = [sum(per_pair[p][e] for p in group_pairs) for e in range(num_experts)]
            if sum(total) == 0:
                raise MoEUsageError(f"no token reached {prefix} for {', '.join(group_pairs)}: "
                                    f"is the {split} data empty?")
            kept[prefix] = select_experts(total, keep)
            share = [c / sum(total) for c in total]
            layers[prefix] = {"counts": total, "share": share, "kept": kept[prefix],
                              "kept_share": sum(share[e] for e in kept[prefix])}
            if keep < num_experts and len(set(total)) == 1:
                log(f"note: {group}: every expert of {prefix} got the same share, so the lowest ids were kept "
                    f"(a random router at k = E? measure with --moe-eval-top-k < E)")
        meta = {"source": os.path.abspath(checkpoint), "directions": group_pairs, "experts": num_experts,
                "kept": kept, "split": split}
        outputs[names[group]] = prune_state(state, kept, changes, meta)
        report["groups"][group] = {"file": names[group], "directions": group_pairs, "layers": layers}
    write_all(out_dir, outputs, f"usage.{per}.keep{keep}.json", report)
    for change, value in changes.items():
        log(f"note: {change} -> {value} (needed for {keep} experts)")
    for group, info in report["groups"].items():
        shares = ", ".join(f"{v['kept_share']:.2f}" for v in info["layers"].values())
        log(f"wrote {os.path.join(out_dir, info['file'])}: {keep} of {num_experts} experts per layer, "
            f"routed share kept per layer {shares}")
    return report


def write_all(out_dir: str, states: Dict[str, dict], report_name: str, report: dict):
    """Every file complete in a staging directory inside out_dir, then each moved into place
    (a rename within one file system): an error leaves no partial file and no new file at all."""
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".moe-prune-", dir=out_dir)
    try:
        for name, state in states.items():
            atomic_save(state, os.path.join(staging, name))
        with open(os.path.join(staging, report_name), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        for name in [*states, report_name]:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_parser():
    p = argparse.ArgumentParser(prog="moe-prune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("checkpoint", help="consolidated MoE checkpoint (moe-consolidate a sharded one first)")
    p.add_argument("--data", required=True, help="fairseq data-bin directory with the --split data of each direction")
    p.add_argument("--lang-pairs", required=True, help="directions to prune for, e.g. en-de,en-fr")
    p.add_argument("--per", choices=PER, default="target",
                   help="one pruned checkpoint per target language (default) or per direction")
    p.add_argument("--keep", type=int, required=True, metavar="N", help="experts to keep in every MoE layer")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the pruned checkpoints")
    p.add_argument("--split", default="valid", help="data split to measure on (default: valid)")
    p.add_argument("--sentences", type=int, help="first sentences per direction to measure on (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per forward pass (default 64)")
    p.add_argument("--moe-eval-top-k", type=int, metavar="K",
                   help="noisy_topk / random routers: experts per token while measuring (default: the saved one)")
    return p


def cli_main(argv=None):
    args = build_parser().parse_args(argv)
    import logging

    logging.getLogger("fairseq").setLevel(logging.WARNING)
    try:
        prune(args.checkpoint, args.data, args.lang_pairs, args.keep, args.out, args.per, args.split,
              args.sentences, args.batch_size, args.moe_eval_top_k)
    except MoEUsageError as e:
        sys.exit(f"moe-prune: error: {e}")


if __name__ == "__main__":
    cli_main()
