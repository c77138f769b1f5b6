"""Label-smoothed cross entropy plus the MoE layers' auxiliary losses, with routing statistics."""
import re
from dataclasses import dataclass, field

from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.logging import metrics

from ..moe.aux_mode import AuxMode
from ..moe.collect import computing_aux, moe_layers, pop_aux
from ..moe.stats import summarize
from ..moe.errors import MoEUsageError

COMBINE_METHODS = ("average", "sum")
# Routing statistics logged as averages over logging outputs (steps, and ranks: fairseq sums
# logging outputs across workers, so each is stored as a sum with a count, "moe_nlogs").
AVERAGED_STATS = ("moe_load_cv", "moe_load_max_mean", "moe_overflow", "moe_gate_entropy", "moe_gating_dropped")
# --moe-log-per-layer: moe_<layer>_<stat>, e.g. moe_enc0_overflow, moe_dec2_e5_load; averaged like
# AVERAGED_STATS.  <layer> is enc<i> / dec<i> for fairseq's encoder.layers.i / decoder.layers.i.
PER_LAYER_KEY = re.compile(r"^moe_(?:enc|dec|layer)\d+_")


@dataclass
class MoELabelSmoothedCrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig):
    moe_gate_loss_combine_method: str = field(
        default="average",
        metadata={"help": "combine the MoE layers' losses by 'average' (over layers) or 'sum'"},
    )
    moe_log_per_layer: bool = field(
        default=False,
        metadata={"help": "also log every MoE layer's load_cv, load_max_mean, overflow (capacity drop rate), "
                          "gating_dropped and each expert's share of the load (e<j>_load), as moe_enc0_overflow, "
                          "moe_dec1_e3_load, ...: meant for --tensorboard-logdir"},
    )


@register_criterion("moe_label_smoothed_cross_entropy", dataclass=MoELabelSmoothedCrossEntropyConfig)
class MoELabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size=0, report_accuracy=False,
                 moe_gate_loss_combine_method="average", moe_log_per_layer=False):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.log_per_layer = moe_log_per_layer
        if moe_gate_loss_combine_method not in COMBINE_METHODS:
            raise MoEUsageError(f"--moe-gate-loss-combine-method must be one of {', '.join(COMBINE_METHODS)} "
                             f"(got {moe_gate_loss_combine_method!r})")
        self.combine_method = moe_gate_loss_combine_method

    def forward(self, model, sample, reduce=True):
        pop_aux(model)  # forget anything left by a forward outside the criterion (e.g. generation)
        with computing_aux(model, AuxMode.ALL):  # validation logs the MoE losses and statistics too
            loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
        # tags of the layers that ran, taken before pop_aux clears what says so
        tags = [t for t, layer in zip(layer_tags(model), moe_layers(model)) if layer.aux.stats is not None] \
            if self.log_per_layer else []
        losses, stats = pop_aux(model)
        moe_loss, parts = self.combine_losses(losses)
        if moe_loss is not None:
            # The token loss is a sum over the batch that fairseq later divides by sample_size:
            # scale the per-batch MoE loss alike so its weight means what the flag says.  It is
            # back-propagated but not logged in `loss`, which stays plain fairseq's label-smoothed
            # cross entropy so that MoE and dense runs compare (docs/statistics.md).
            loss = loss + moe_loss * sample_size
            logging_output["moe_loss"] = moe_loss.data * sample_size
            for name, value in parts.items():
                logging_output[f"moe_{name}_loss"] = value.data * sample_size
        if stats:
            summary = summarize(stats, per_layer=self.log_per_layer)
            logging_output["moe_nlogs"] = 1
            for key in AVERAGED_STATS:
                if key in summary:
                    logging_output[key] = summary[key]
            logging_output["moe_a2a_bytes"] = summary["moe_a2a_bytes"]
            for tag, layer in zip(tags, summary.get("layers", [])):
                for name in ("load_cv", "load_max_mean", "overflow", "gating_dropped"):
                    logging_output[f"moe_{tag}_{name}"] = layer[name]
                for j, share in enumerate(layer["expert_load"]):
                    logging_output[f"moe_{tag}_e{j}_load"] = share
        return loss, sample_size, logging_output

    def combine_losses(self, losses):
        if not losses:
            return None, {}
        parts = {}
        for layer_losses in losses:
            for name, value in layer_losses.items():
                parts[name] = parts[name] + value if name in parts else value
        if not parts:
            return None, {}
        if self.combine_method == "average":
            parts = {name: value / len(losses) for name, value in parts.items()}
        return sum(parts.values()), parts

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        keys = {k for log in logging_outputs for k in log if k.startswith("moe_") and k.endswith("_loss")}
        for key in sorted(keys):
            total = utils.item(sum(log.get(key, 0) for log in logging_outputs))
            metrics.log_scalar(key, total / max(sample_size, 1), sample_size, round=5)
        nlogs = utils.item(sum(log.get("moe_nlogs", 0) for log in logging_outputs))
        if nlogs:
            for key in AVERAGED_STATS:
                if any(key in log for log in logging_outputs):
                    value = sum(log.get(key, 0) for log in logging_outputs) / nlogs
                    metrics.log_scalar(key, value, nlogs, round=4)
            per_layer = {k for log in logging_outputs for k in log if PER_LAYER_KEY.match(k)}
            for key in sorted(per_layer):
                metrics.log_scalar(key, sum(log.get(key, 0) for log in logging_outputs) / nlogs, nlogs, round=4)
            a2a = sum(log.get("moe_a2a_bytes", 0) for log in logging_outputs)
            metrics.log_scalar("moe_a2a_mb", a2a / nlogs / 1e6, nlogs, round=3)


def layer_tags(model):
    """enc<i> / dec<i> for each MoE layer of `model` (the order of moe_layers), from fairseq's
    module names encoder.layers.i / decoder.layers.i; layer<n> for a layer elsewhere."""
    cached = getattr(model, "_moe_layer_tags", None)
    if cached is None:
        layers = {id(m): n for n, m in model.named_modules()}
        cached = []
        for n, layer in enumerate(moe_layers(model)):
            m = re.search(r"(encoder|decoder)\.layers\.(\d+)", layers.get(id(layer), ""))
            cached.append(f"{m.group(1)[:3]}{m.group(2)}" if m else f"layer{n}")
        object.__setattr__(model, "_moe_layer_tags", cached)
    return cached
