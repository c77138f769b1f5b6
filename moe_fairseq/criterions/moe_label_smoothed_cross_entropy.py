"""Label-smoothed cross entropy plus the MoE layers' auxiliary losses, with routing statistics."""
from dataclasses import dataclass, field

from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.logging import metrics

from ..moe.collect import aux_in_evaluation, pop_aux
from ..moe.stats import summarize
from ..moe.errors import MoEUsageError

COMBINE_METHODS = ("average", "sum")
# Routing statistics logged as averages over logging outputs (steps, and ranks: fairseq sums
# logging outputs across workers, so each is stored as a sum with a count, "moe_nlogs").
AVERAGED_STATS = ("moe_load_cv", "moe_load_max_mean", "moe_overflow", "moe_gate_entropy", "moe_gating_dropped")


@dataclass
class MoELabelSmoothedCrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig):
    moe_gate_loss_combine_method: str = field(
        default="average",
        metadata={"help": "combine the MoE layers' losses by 'average' (over layers) or 'sum'"},
    )


@register_criterion("moe_label_smoothed_cross_entropy", dataclass=MoELabelSmoothedCrossEntropyConfig)
class MoELabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size=0, report_accuracy=False,
                 moe_gate_loss_combine_method="average"):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        if moe_gate_loss_combine_method not in COMBINE_METHODS:
            raise MoEUsageError(f"--moe-gate-loss-combine-method must be one of {', '.join(COMBINE_METHODS)} "
                             f"(got {moe_gate_loss_combine_method!r})")
        self.combine_method = moe_gate_loss_combine_method

    def forward(self, model, sample, reduce=True):
        pop_aux(model)  # forget anything left by a forward outside the criterion (e.g. generation)
        with aux_in_evaluation(model):  # validation logs the MoE losses and statistics too
            loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
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
            summary = summarize(stats)
            logging_output["moe_nlogs"] = 1
            for key in AVERAGED_STATS:
                if key in summary:
                    logging_output[key] = summary[key]
            logging_output["moe_a2a_bytes"] = summary["moe_a2a_bytes"]
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
            a2a = sum(log.get("moe_a2a_bytes", 0) for log in logging_outputs)
            metrics.log_scalar("moe_a2a_mb", a2a / nlogs / 1e6, nlogs, round=3)
