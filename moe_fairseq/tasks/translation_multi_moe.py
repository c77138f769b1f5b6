"""`translation_multi_moe`: fairseq's translation_multi_simple_epoch, made aware of MoE layers.

What it adds: it hands the update number to the MoE layers (k schedules, the synchronised
Gating Dropout decision), applies the evaluation-time k (self-slimmable inference) to the
routers, computes BLEU with sacrebleu during validation, and checks the expert/world-size
layout before training starts.
"""
import json
import logging
import os
from argparse import Namespace

import numpy as np
import torch
from fairseq import utils
from fairseq.tasks import register_task
from fairseq.tasks.translation_multi_simple_epoch import TranslationMultiSimpleEpochTask

from ..distributed.expert_parallel_training import prepare_expert_parallel
from ..models.moe_args import add_flags
from ..models.transformer_moe import apply_eval_overrides
from ..moe.collect import moe_layers
from ..moe.errors import MoEUsageError
from ..moe.generation_in_step import generate_in_step
from ..moe.layer import MoELayer

logger = logging.getLogger(__name__)
EVAL_BLEU_ORDER = 4


@register_task("translation_multi_moe")
class TranslationMultiMoETask(TranslationMultiSimpleEpochTask):
    @staticmethod
    def add_args(parser):
        TranslationMultiSimpleEpochTask.add_args(parser)
        g = parser.add_argument_group("MoE task")
        add_flags(g, scope="task")  # --moe-eval-top-k (moe.config.MoEConfig.eval_top_k)
        g.add_argument("--eval-bleu", action="store_true", help="compute sacrebleu BLEU during validation")
        g.add_argument("--eval-bleu-args", type=str, default="{}",
                       help='generation args for validation BLEU as JSON, e.g. \'{"beam": 4}\'')
        g.add_argument("--eval-bleu-remove-bpe", type=str, default="sentencepiece",
                       help="subword marker to remove before scoring (fairseq's --post-process)")
        g.add_argument("--eval-bleu-print-samples", action="store_true", help="log a hypothesis per batch")
        g.add_argument("--collective-timeout", type=float, metavar="SECONDS", default=None,
                       help="seconds a rank waits in one collective (all-to-all, all-reduce, barrier) for "
                            "its peers before it fails, so that a job whose rank died or hangs ends instead "
                            "of waiting; default: torch's (30 min gloo, 10 min NCCL). The process group's "
                            "timeout (moe_fairseq sets it, fairseq_patches.py)")

    @classmethod
    def setup_task(cls, args, **kwargs):
        check_data_dir(args)
        return super().setup_task(args, **kwargs)

    def build_model(self, args, from_checkpoint=False):
        model = super().build_model(args, from_checkpoint)
        apply_eval_overrides(model, getattr(self.args, "moe_eval_top_k", None))
        prepare_expert_parallel(model, self.args)
        if getattr(self.args, "eval_bleu", False):
            gen_args = Namespace(**json.loads(self.args.eval_bleu_args or "{}"))
            # The parent's build_generator needs one --target-lang; validation mixes all
            # directions, so build the plain generator and strip every language token.
            self.bleu_generator = super(TranslationMultiSimpleEpochTask, self).build_generator(
                [model], gen_args, extra_gen_cls_kwargs={"symbols_to_strip_from_output": self._langtok_ids()})
        return model

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        for layer in moe_layers(model):
            layer.set_num_updates(update_num)  # the layer passes it on to its router
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        if getattr(self.args, "eval_bleu", False):
            bleu = self._inference_with_bleu(self.bleu_generator, sample, model)
            logging_output["_bleu_sys_len"] = bleu.sys_len
            logging_output["_bleu_ref_len"] = bleu.ref_len
            for i in range(EVAL_BLEU_ORDER):
                logging_output["_bleu_counts_" + str(i)] = bleu.counts[i]
                logging_output["_bleu_totals_" + str(i)] = bleu.totals[i]
        return loss, sample_size, logging_output

    def _inference_with_bleu(self, generator, sample, model):
        import sacrebleu

        tgt_dict = self.target_dictionary
        # The target starts with the language token when --decoder-langtok is on: force it as
        # the first generated token so each sentence is decoded into its own language.
        prefix = sample["target"][:, :1] if self.args.decoder_langtok else None
        with torch.no_grad():
            # With expert parallelism ranks decode different numbers of steps, each a collective
            # in every MoE decoder layer: keep them in step (moe/generation_in_step.py).
            hyps_out = generate_in_step(lambda: generator.generate([model], sample, prefix_tokens=prefix),
                                        decoder_moe_layers(model))
        strip = self._langtok_ids()
        hyps, refs = [], []
        for i, out in enumerate(hyps_out):
            hyps.append(self._decode(out[0]["tokens"], strip))
            refs.append(self._decode(utils.strip_pad(sample["target"][i], tgt_dict.pad()), strip))
        if getattr(self.args, "eval_bleu_print_samples", False) and hyps:
            logger.info("example hypothesis: %s", hyps[0])
            logger.info("example reference: %s", refs[0])
        return sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a")

    def _langtok_ids(self):
        tgt_dict = self.target_dictionary
        return {i for i, sym in enumerate(tgt_dict.symbols) if sym.startswith("__") and sym.endswith("__")}

    def _decode(self, tokens, strip):
        return self.target_dictionary.string(
            tokens.int().cpu(), self.args.eval_bleu_remove_bpe, extra_symbols_to_ignore=strip,
        )

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if not getattr(self.args, "eval_bleu", False):
            return
        from fairseq.logging import metrics

        def total(key):
            return sum(float(log.get(key, 0)) for log in logging_outputs)

        counts = [total("_bleu_counts_" + str(i)) for i in range(EVAL_BLEU_ORDER)]
        totals = [total("_bleu_totals_" + str(i)) for i in range(EVAL_BLEU_ORDER)]
        if max(totals) > 0:
            metrics.log_scalar("_bleu_counts", np.array(counts))
            metrics.log_scalar("_bleu_totals", np.array(totals))
            metrics.log_scalar("_bleu_sys_len", total("_bleu_sys_len"))
            metrics.log_scalar("_bleu_ref_len", total("_bleu_ref_len"))

            def compute_bleu(meters):
                import sacrebleu

                bleu = sacrebleu.metrics.BLEU.compute_bleu(
                    correct=meters["_bleu_counts"].sum, total=meters["_bleu_totals"].sum,
                    sys_len=int(meters["_bleu_sys_len"].sum), ref_len=int(meters["_bleu_ref_len"].sum),
                    smooth_method="exp")
                return round(bleu.score, 2)

            metrics.log_derived("bleu", compute_bleu)


def decoder_moe_layers(model):
    """The MoE layers of the model's decoder, in the order a decoder step calls them (module
    order; the model may be wrapped for data parallelism)."""
    return [m for name, m in model.named_modules() if isinstance(m, MoELayer)
            and (name.startswith("decoder.") or ".decoder." in name)]


def check_data_dir(args):
    """Refuse, in one line, a data directory that lacks a requested direction (fairseq would
    fail later with a FileNotFoundError deep in the data loader)."""
    if not getattr(args, "data", None):
        return
    data = args.data.split(":")[0]
    if not os.path.isdir(data):
        raise MoEUsageError(f"data directory {data} does not exist")
    # fairseq's multilingual manager treats a run with both --source-lang and --target-lang as
    # inference on that one direction (gen_subset), anything else as training on --lang-pairs.
    if getattr(args, "source_lang", None) and getattr(args, "target_lang", None):
        split, pairs = getattr(args, "gen_subset", "test"), [f"{args.source_lang}-{args.target_lang}"]
    else:
        split = getattr(args, "train_subset", "train")
        pairs = args.lang_pairs if isinstance(args.lang_pairs, list) else (args.lang_pairs or "").split(",")
    missing = []
    for pair in filter(None, pairs):
        src, tgt = pair.split("-")
        candidates = [os.path.join(data, f"{split}.{a}-{b}.{src}.idx") for a, b in ((src, tgt), (tgt, src))]
        if not any(os.path.exists(c) for c in candidates):
            missing.append(pair)
    if missing:
        raise MoEUsageError(f"data directory {data} has no '{split}' data for --lang-pairs {','.join(missing)} "
                            f"(expected files like {split}.{missing[0]}.{missing[0].split('-')[0]}.idx)")
