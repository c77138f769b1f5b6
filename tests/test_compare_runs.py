"""moe_fairseq.experiments.compare_runs (scripts/compare_runs.py): paired bootstrap between runs'
saved moe-evaluate outputs."""
import random

import pytest

from moe_fairseq.experiments import compare_runs
from moe_fairseq.moe.errors import MoEUsageError

VOCAB = [f"w{i}" for i in range(400)]


def corrupt(sentence, rate, rng):
    return " ".join(rng.choice(VOCAB) if rng.random() < rate else w for w in sentence.split())


def write_run(run_dir, pairs, refs, rate, seed, shuffle=True):
    """A generate.test.<pair>.txt per direction whose hypotheses are the references with a share
    `rate` of their words replaced, printed in a shuffled order as fairseq-generate does."""
    rng, order_rng = random.Random(seed), random.Random(seed + 1000)
    run_dir.mkdir(parents=True)
    for pair in pairs:
        hyps = [corrupt(ref, rate, rng) for ref in refs[pair]]
        ids = list(range(len(hyps)))
        if shuffle:
            order_rng.shuffle(ids)
        lines = []
        for i in ids:
            lines += [f"S-{i}\tsrc", f"H-{i}\t-0.5\t{hyps[i]}", f"D-{i}\t-0.5\t{hyps[i]}"]
        (run_dir / f"generate.test.{pair}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def study(tmp_path):
    rng = random.Random(0)
    pairs = ["en-de", "en-fr"]
    raw = tmp_path / "raw"
    raw.mkdir()
    refs = {}
    for pair in pairs:
        refs[pair] = [" ".join(rng.choice(VOCAB) for _ in range(rng.randint(6, 14))) for _ in range(200)]
        (raw / f"test.{pair}.{pair.split('-')[1]}").write_text("\n".join(refs[pair]) + "\n")
    write_run(tmp_path / "weak", pairs, refs, rate=0.5, seed=1)
    write_run(tmp_path / "strong", pairs, refs, rate=0.2, seed=2)
    write_run(tmp_path / "weak_again", pairs, refs, rate=0.5, seed=1, shuffle=False)  # same hyps, other order
    # the weak hypotheses with 3 sentences per direction re-corrupted: a difference within noise
    (tmp_path / "twin").mkdir()
    for pair in pairs:
        lines = (tmp_path / "weak" / f"generate.test.{pair}.txt").read_text().splitlines()
        for n, line in enumerate(lines):
            tag, score, hyp = (line.split("\t") + ["", ""])[:3]
            if tag[0] in "HD" and int(tag[2:]) < 3:
                lines[n] = f"{tag}\t{score}\t{corrupt(refs[pair][int(tag[2:])], 0.5, rng)}"
        (tmp_path / "twin" / f"generate.test.{pair}.txt").write_text("\n".join(lines) + "\n")
    return tmp_path, pairs, refs


def test_a_clearly_better_run_is_significant_and_an_equally_good_one_is_not(study):
    import sacrebleu

    root, pairs, refs = study
    result = compare_runs.main([str(root / "weak"), str(root / "strong"), str(root / "weak_again"),
                                str(root / "twin"), "--labels", "weak,strong,same,twin", "--raw-dir", str(root / "raw"),
                                "--samples", "200", "--out", str(root / "sig")])
    assert result["directions"] == pairs
    for key in pairs + ["all"]:
        rows = {r["system"]: r for r in result["table"][key]}
        assert result["table"][key][0]["system"] == "weak" and rows["weak"]["p_value"] is None
        assert rows["strong"]["bleu"] > rows["weak"]["bleu"] + 10
        assert rows["strong"]["p_value"] < 0.01
        # the same hypotheses in another output order: aligned by id, so the same score
        assert rows["same"]["bleu"] == rows["weak"]["bleu"]
        # a run differing in 3 sentences of 200: whatever BLEU gap there is, it is not significant
        assert rows["twin"]["p_value"] > 0.05
    # the per-direction score is sacrebleu's corpus BLEU of the id-aligned hypotheses
    hyps = compare_runs.parse_generate_output((root / "strong" / "generate.test.en-de.txt").read_text())
    expected = sacrebleu.corpus_bleu([hyps[i] for i in range(200)], [refs["en-de"]]).score
    assert {r["system"]: r for r in result["table"]["en-de"]}["strong"]["bleu"] == round(expected, 2)
    # "all" pools the directions into one test set of 400 sentences
    pooled = [hyps[i] for i in range(200)] + [
        compare_runs.parse_generate_output((root / "strong" / "generate.test.en-fr.txt").read_text())[i]
        for i in range(200)]
    expected = sacrebleu.corpus_bleu(pooled, [refs["en-de"] + refs["en-fr"]]).score
    assert {r["system"]: r for r in result["table"]["all"]}["strong"]["bleu"] == round(expected, 2)
    md = (root / "sig" / "significance.md").read_text()
    assert "weak (baseline)" in md and "nrefs:1" in md and (root / "sig" / "significance.json").exists()


def test_baseline_can_be_any_run(study):
    root, _, _ = study
    result = compare_runs.main([str(root / "weak"), str(root / "strong"), "--labels", "weak,strong",
                                "--baseline", "strong", "--raw-dir", str(root / "raw"), "--samples", "100"])
    rows = result["table"]["all"]
    assert rows[0]["system"] == "strong" and rows[1]["system"] == "weak"
    assert rows[1]["p_value"] < 0.01  # the test is two-sided: a clearly worse run differs too


def test_bad_input_is_refused_in_one_line(study, tmp_path):
    root, _, _ = study
    raw = str(root / "raw")
    with pytest.raises(MoEUsageError, match="--labels has 1 names for 2"):
        compare_runs.main([str(root / "weak"), str(root / "strong"), "--labels", "x", "--raw-dir", raw])
    with pytest.raises(MoEUsageError, match="--baseline 'nope'"):
        compare_runs.main([str(root / "weak"), "--baseline", "nope", "--labels", "weak", "--raw-dir", raw])
    with pytest.raises(MoEUsageError, match="does not exist"):
        compare_runs.main([str(root / "missing"), "--raw-dir", raw])
    with pytest.raises(MoEUsageError, match="not unique"):
        compare_runs.main([str(root / "weak"), str(root / "strong"), "--labels", "a,a", "--raw-dir", raw])
    # without --labels a run is named after its directory (or RUN for RUN/eval)
    (root / "other" / "eval").mkdir(parents=True)
    for f in (root / "strong").iterdir():
        (root / "other" / "eval" / f.name).write_text(f.read_text())
    result = compare_runs.main([str(root / "weak"), str(root / "other" / "eval"), "--raw-dir", raw, "--samples", "100"])
    assert [r["system"] for r in result["table"]["all"]] == ["weak", "other"]
    # a run lacking a direction
    (root / "partial").mkdir()
    (root / "partial" / "generate.test.en-de.txt").write_text((root / "weak" / "generate.test.en-de.txt").read_text())
    with pytest.raises(MoEUsageError, match="compare like with like"):
        compare_runs.main([str(root / "weak"), str(root / "partial"), "--raw-dir", raw])
    # a run with a sentence left out is refused, never scored on a shorter list
    (root / "short").mkdir()
    for pair in ("en-de", "en-fr"):
        lines = (root / "weak" / f"generate.test.{pair}.txt").read_text().splitlines()
        keep = [l for l in lines if not l.split("\t")[0].endswith("-7")]
        (root / "short" / f"generate.test.{pair}.txt").write_text("\n".join(keep) + "\n")
    with pytest.raises(MoEUsageError, match="refusing to score a shorter list"):
        compare_runs.main([str(root / "weak"), str(root / "short"), "--raw-dir", raw])


def test_the_script_refuses_a_missing_run_in_one_line(tmp_path):
    """scripts/compare_runs.py end to end: bad input is moe_fairseq's one-line error, no traceback."""
    import subprocess
    import sys

    from cli_helpers import REPO

    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "compare_runs.py"), str(tmp_path / "missing"),
                           "--raw-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"moe_fairseq: error: run directory {tmp_path / 'missing'} does not "
                                                "exist (expected moe-evaluate --out output)"]
