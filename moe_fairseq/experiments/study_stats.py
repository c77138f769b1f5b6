"""The statistics of the Multi30k study: sacrebleu's sufficient statistics of the pooled test sets,
the two-level bootstrap over seeds and test sentences, and the small formatting helpers of its
tables (see moe_fairseq/experiments/study_report.py for the method)."""
import math
from pathlib import Path

from ..moe.errors import MoEUsageError
from ..tools.evaluate import align, find_references, parse_generate_output, read_lines
from .study_records import DIRECTIONS


# ------------------------------------------------------------------ statistics

def hypotheses(eval_dir: Path, pair: str, n_refs: int) -> list:
    """The detokenized hypotheses of one direction in sentence order: from moe-evaluate's
    generate.test.PAIR.txt, or from an archived run's hyp.test.PAIR.txt.gz (`archive`)."""
    gen = eval_dir / f"generate.test.{pair}.txt"
    if gen.is_file():
        return align(parse_generate_output(gen.read_text(encoding="utf-8")), n_refs, False, str(gen))
    archived = eval_dir / f"hyp.test.{pair}.txt.gz"
    if not archived.is_file():
        raise MoEUsageError(f"{eval_dir}: no {gen.name} or {archived.name} (an evaluation directory of the study)")
    hyps = read_lines(archived)
    if len(hyps) != n_refs:
        raise MoEUsageError(f"{archived}: {len(hyps)} hypotheses for {n_refs} references: wrong --raw-dir?")
    return hyps


def sentence_stats(eval_dir: Path, raw_dir: Path):
    """(N x 10) sacrebleu BLEU sufficient statistics of the pooled test sets, in DIRECTIONS order."""
    import numpy as np
    from sacrebleu.metrics import BLEU

    rows = []
    for pair in DIRECTIONS:
        src, tgt = pair.split("-")
        refs = read_lines(find_references(raw_dir, "test", src, tgt))
        rows += BLEU()._extract_corpus_statistics(hypotheses(eval_dir, pair, len(refs)), [refs])
    return np.asarray(rows, dtype=np.int64)


def corpus_bleu(stats) -> float:
    from sacrebleu.metrics import BLEU

    return BLEU()._compute_score_from_stats(list(stats)).score


def hierarchical_bootstrap(systems, baseline, samples=1000, seed=12345):
    """systems/baseline: [N x 10 stats, one per training seed].  Returns (delta, lo, hi, p): the
    seed-mean corpus BLEU difference, its 95% percentile interval and a two-sided p-value, over
    resampled test sentences (shared) and resampled seeds (per system)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = systems[0].shape[0]
    point = np.mean([corpus_bleu(s.sum(0)) for s in systems]) - np.mean([corpus_bleu(s.sum(0)) for s in baseline])
    deltas = np.empty(samples)
    for b in range(samples):
        w = np.bincount(rng.integers(0, n, n), minlength=n)
        side = []
        for group in (systems, baseline):
            picks = rng.integers(0, len(group), len(group))
            side.append(np.mean([corpus_bleu(w @ group[i]) for i in picks]))
        deltas[b] = side[0] - side[1]
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    p = min(1.0, 2 * min((deltas <= 0).mean(), (deltas >= 0).mean()))
    return float(point), float(lo), float(hi), max(p, 1.0 / samples)


# ------------------------------------------------------------------ the report's numbers

def mean_std(values):
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def fmt(values, digits=2):
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def time_to_loss(curve, target, ups):
    """Minutes (at `ups` updates/s) until the validation loss first reaches `target`, linearly
    interpolated between validation points; None if it never does."""
    prev = None
    for pt in curve:
        if pt["loss"] <= target:
            if prev is None:
                return pt["updates"] / ups / 60
            (u0, l0), (u1, l1) = prev, (pt["updates"], pt["loss"])
            u = u0 + (u1 - u0) * (l0 - target) / (l0 - l1) if l0 != l1 else u1
            return u / ups / 60
        prev = (pt["updates"], pt["loss"])
    return None

