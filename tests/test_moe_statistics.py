"""Values of every logged MoE statistic and of the loss units, on hand-computed small batches.

The convention (docs/statistics.md): fairseq's `loss` and `nll_loss` are exactly what plain
fairseq logs (label-smoothed cross entropy and NLL, bits per token), so a MoE run's validation
loss compares with a dense run's; the MoE auxiliary loss is added to the loss that is
back-propagated, and logged on its own as `moe_loss` (and `moe_<name>_loss`) in the units the
weight flags give it: the value added to the per-token training loss.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.logging import metrics

from moe_fairseq.criterions.moe_label_smoothed_cross_entropy import MoELabelSmoothedCrossEntropyCriterion
from moe_fairseq.moe import MoEConfig, build_moe_layer
from moe_fairseq.moe.layer import MoEAux
from moe_fairseq.moe.stats import RoutingStats, summarize

PAD, V, EPS = 1, 6, 0.1


def routing_stats(tokens_per_expert, tokens, requested, dropped, entropy_sum, gating_dropped, a2a):
    t = torch.tensor
    return RoutingStats(num_tokens=t(float(tokens)), requested_slots=t(float(requested)),
                        tokens_per_expert=t(tokens_per_expert), dropped_by_capacity=t(float(dropped)),
                        gate_entropy_sum=t(float(entropy_sum)), gating_dropped=t(float(gating_dropped)),
                        a2a_bytes=t(float(a2a)))


# Layer A: loads (2, 2, 4, 0): mean 2, population std sqrt(2) -> cv 0.70711, max/mean 2.
# Layer B: loads (3, 3, 3, 3): cv 0, max/mean 1.
# Layer C: no slots at all (a gating-dropped step): left out of cv and max/mean only.
LAYER_A = routing_stats([2, 2, 4, 0], tokens=4, requested=8, dropped=1, entropy_sum=2.0, gating_dropped=0, a2a=1_500_000)
LAYER_B = routing_stats([3, 3, 3, 3], tokens=6, requested=12, dropped=2, entropy_sum=4.0, gating_dropped=0, a2a=2_500_000)
LAYER_C = routing_stats([0, 0, 0, 0], tokens=5, requested=0, dropped=0, entropy_sum=0.0, gating_dropped=1, a2a=0)


def test_summarize_values_by_hand():
    s = summarize([LAYER_A, LAYER_B, LAYER_C])
    assert s["moe_layers"] == 3
    assert s["moe_load_cv"] == pytest.approx((math.sqrt(2) / 2 + 0) / 2)
    assert s["moe_load_max_mean"] == pytest.approx((2 + 1) / 2)
    assert s["moe_overflow"] == pytest.approx(3 / 20)  # dropped slots / requested slots, over layers
    assert s["moe_gate_entropy"] == pytest.approx(6 / 15)  # entropy per non-padding token
    assert s["moe_gating_dropped"] == pytest.approx(1 / 3)  # fraction of layers that skipped the router
    assert s["moe_a2a_bytes"] == 4_000_000
    assert summarize([]) == {}


def test_summarize_without_any_routed_slot():
    s = summarize([LAYER_C])
    assert "moe_load_cv" not in s and "moe_load_max_mean" not in s
    assert s["moe_overflow"] == 0 and s["moe_gating_dropped"] == 1 and s["moe_gate_entropy"] == 0


class Task:
    class target_dictionary:
        @staticmethod
        def pad():
            return PAD


class HandModel(nn.Module):
    """Fixed logits; two real MoE layers whose aux is set by hand, as a forward would leave it."""

    def __init__(self, logits, auxes):
        super().__init__()
        self.logits = logits
        self.auxes = auxes
        self.layers = nn.ModuleList(build_moe_layer(MoEConfig(num_experts=4), 8, 16) for _ in auxes)

    def forward(self, src_tokens, src_lengths, prev_output_tokens):
        for layer, (losses, stats) in zip(self.layers, self.auxes):
            layer.aux = MoEAux(dict(losses), stats)
        return self.logits, {}

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        return F.log_softmax(net_output[0].float(), dim=-1) if log_probs else F.softmax(net_output[0].float(), -1)

    def get_targets(self, sample, net_output):
        return sample["target"]


def hand_batch(seed, target):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*target.shape, V, generator=g)
    sample = {"net_input": {"src_tokens": target, "src_lengths": None, "prev_output_tokens": target},
              "target": target, "ntokens": int((target != PAD).sum()), "nsentences": target.shape[0]}
    return logits, sample


def smoothed_ce_by_hand(logits, target):
    """sum over non-padding tokens of -sum_v q(v) log p(v), q = 1 - eps on the target and
    eps / (V - 1) elsewhere (fairseq's label smoothing), and the plain NLL; in nats."""
    lp = torch.log_softmax(logits.double(), -1)
    loss = nll = 0.0
    for b in range(target.shape[0]):
        for t in range(target.shape[1]):
            y = int(target[b, t])
            if y == PAD:
                continue
            q = torch.full((V,), EPS / (V - 1), dtype=torch.double)
            q[y] = 1 - EPS
            loss += float(-(q * lp[b, t]).sum())
            nll += float(-lp[b, t, y])
    return loss, nll


TARGETS = [torch.tensor([[2, 3, 4, PAD], [5, 2, 2, 3]]), torch.tensor([[4, 4, 5], [3, PAD, PAD]])]
LOSSES = [  # per batch: the losses of each of the two MoE layers
    [{"balance": torch.tensor(0.3)}, {"balance": torch.tensor(0.5), "z": torch.tensor(0.1)}],
    [{"balance": torch.tensor(0.2)}, {"balance": torch.tensor(0.4), "z": torch.tensor(0.3)}],
]
STATS = [[LAYER_A, LAYER_B], [LAYER_B, LAYER_C]]


def run_criterion(method="average", **options):
    crit = MoELabelSmoothedCrossEntropyCriterion(Task, sentence_avg=False, label_smoothing=EPS,
                                                 moe_gate_loss_combine_method=method, **options)
    outs = []
    for i, target in enumerate(TARGETS):
        logits, sample = hand_batch(i, target)
        model = HandModel(logits, list(zip(LOSSES[i], STATS[i])))
        loss, sample_size, log = crit(model, sample)
        outs.append((loss, sample_size, log, logits, target))
    with metrics.aggregate(new_root=True) as agg:
        crit.reduce_metrics([o[2] for o in outs])
        logged = agg.get_smoothed_values()
    return outs, logged


@pytest.mark.parametrize("method", ["average", "sum"])
def test_criterion_losses_and_logged_values_by_hand(method):
    outs, logged = run_criterion(method)
    total_ce = total_nll = total_size = 0.0
    moe_sum = {"moe_loss": 0.0, "moe_balance_loss": 0.0, "moe_z_loss": 0.0}
    for i, (loss, sample_size, log, logits, target) in enumerate(outs):
        ce, nll = smoothed_ce_by_hand(logits, target)
        ntok = int((target != PAD).sum())
        assert sample_size == ntok == log["sample_size"]
        layers = LOSSES[i]
        balance = sum(float(l["balance"]) for l in layers)
        z = sum(float(l.get("z", 0)) for l in layers)
        if method == "average":  # over the 2 MoE layers
            balance, z = balance / 2, z / 2
        # back-propagated: the token loss (a sum) plus the batch's MoE loss scaled by sample_size,
        # so that after fairseq's division by sample_size the MoE loss weighs what its flag says
        assert float(loss) == pytest.approx(ce + (balance + z) * ntok, rel=1e-5)
        # logged: plain fairseq's loss, without the MoE loss
        assert float(log["loss"]) == pytest.approx(ce, rel=1e-5)
        assert float(log["nll_loss"]) == pytest.approx(nll, rel=1e-5)
        assert float(log["moe_loss"]) == pytest.approx((balance + z) * ntok, rel=1e-5)
        assert float(log["moe_balance_loss"]) == pytest.approx(balance * ntok, rel=1e-5)
        assert float(log["moe_z_loss"]) == pytest.approx(z * ntok, rel=1e-5)
        total_ce, total_nll, total_size = total_ce + ce, total_nll + nll, total_size + ntok
        moe_sum["moe_loss"] += (balance + z) * ntok
        moe_sum["moe_balance_loss"] += balance * ntok
        moe_sum["moe_z_loss"] += z * ntok
    # reduce_metrics over the two batches (as over two ranks or two steps)
    assert logged["loss"] == pytest.approx(total_ce / total_size / math.log(2), abs=1e-3)  # bits, rounded
    assert logged["nll_loss"] == pytest.approx(total_nll / total_size / math.log(2), abs=1e-3)
    for key, value in moe_sum.items():  # the value added to the per-token loss, sample-size weighted
        assert logged[key] == pytest.approx(value / total_size, abs=1e-5), key
    # statistics: averaged over the two logging outputs, each summarising its layers
    s1, s2 = summarize(STATS[0]), summarize(STATS[1])
    for key in ("moe_overflow", "moe_gate_entropy", "moe_gating_dropped"):
        assert logged[key] == pytest.approx((s1[key] + s2[key]) / 2, abs=1e-4), key
    assert logged["moe_gating_dropped"] == pytest.approx(0.25, abs=1e-4)
    # cv is absent from no output here (each batch has a layer with slots)
    assert logged["moe_load_cv"] == pytest.approx((s1["moe_load_cv"] + s2["moe_load_cv"]) / 2, abs=1e-4)
    assert logged["moe_a2a_mb"] == pytest.approx((4.0 + 2.5) / 2, abs=1e-3)  # MB per logging output


def test_sum_weighs_the_moe_loss_twice_as_average_over_two_layers():
    (avg, _), (summed, _) = run_criterion("average"), run_criterion("sum")
    for a, s in zip(avg, summed):
        assert float(s[2]["moe_loss"]) == pytest.approx(2 * float(a[2]["moe_loss"]))
        assert float(s[2]["loss"]) == pytest.approx(float(a[2]["loss"]))  # logged CE unaffected


def test_per_layer_summary_by_hand():
    """--moe-log-per-layer's numbers: each layer's own load balance, drop rate and expert shares
    (the aggregates are unchanged)."""
    s = summarize([LAYER_A, LAYER_B, LAYER_C], per_layer=True)
    assert {k: v for k, v in s.items() if k != "layers"} == summarize([LAYER_A, LAYER_B, LAYER_C])
    a, b, c = s["layers"]
    assert a["load_cv"] == pytest.approx(math.sqrt(2) / 2) and a["load_max_mean"] == pytest.approx(2)
    assert a["overflow"] == pytest.approx(1 / 8) and b["overflow"] == pytest.approx(2 / 12) and c["overflow"] == 0
    assert a["expert_load"] == pytest.approx([0.25, 0.25, 0.5, 0.0])
    assert b["expert_load"] == pytest.approx([0.25] * 4) and c["expert_load"] == [0.0] * 4
    assert (a["gating_dropped"], b["gating_dropped"], c["gating_dropped"]) == (0, 0, 1)
    assert "layers" not in summarize([LAYER_A])


@pytest.mark.parametrize("per_layer", [False, True])
def test_criterion_logs_each_layer_only_when_asked(per_layer):
    _, logged = run_criterion(moe_log_per_layer=per_layer)
    per_layer_keys = {k for k in logged if k.startswith("moe_layer")}
    if not per_layer:
        assert per_layer_keys == set()
        return
    # HandModel's layers are layers.0 and layers.1 (neither encoder nor decoder): layer0, layer1.
    # Batch 1 ran A then B, batch 2 B then C: each key is the mean over the two batches.
    assert logged["moe_layer0_overflow"] == pytest.approx((1 / 8 + 2 / 12) / 2, abs=1e-4)
    assert logged["moe_layer1_overflow"] == pytest.approx((2 / 12 + 0) / 2, abs=1e-4)
    assert logged["moe_layer1_gating_dropped"] == pytest.approx(0.5)
    assert logged["moe_layer0_e2_load"] == pytest.approx((0.5 + 0.25) / 2)
    assert len(per_layer_keys) == 2 * (4 + 4)


def test_layer_tags_name_encoder_and_decoder_layers():
    from moe_fairseq.criterions.moe_label_smoothed_cross_entropy import layer_tags

    model = nn.Module()
    model.encoder = nn.Module()
    model.encoder.layers = nn.ModuleList([nn.Linear(1, 1), build_moe_layer(MoEConfig(num_experts=2), 4, 8)])
    model.decoder = nn.Module()
    model.decoder.layers = nn.ModuleList([build_moe_layer(MoEConfig(num_experts=2), 4, 8)])
    model.extra = build_moe_layer(MoEConfig(num_experts=2), 4, 8)
    assert layer_tags(model) == ["enc1", "dec0", "layer2"]
