"""The Multi30k study's machinery (moe_fairseq/experiments/study_*.py, the commands of
scripts/study_report.py and scripts/study_throughput.py, and scripts/run_study.sh), on synthetic
logs and hypotheses: no training.

The statistics are checked against brute force: BLEU from the summed sufficient statistics
equals sacrebleu's corpus_score, the bootstrap sees a real difference and no difference where
there is none, the SMoE-Dropout schedule cost equals a per-update loop.
"""
import json
import random
import subprocess
from pathlib import Path

import pytest

from moe_fairseq.experiments import study_records, study_report as report, study_stats
from moe_fairseq.experiments import study_throughput
from moe_fairseq.moe.errors import MoEUsageError
from stand_ins import MOE_EVALUATE, write_tools

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
DIRECTIONS = ("en-de", "en-fr", "en-cs")
WORDS = "a man in a blue shirt is riding a bike down the street while two dogs run next to him".split()




def sentence(rng, n=10):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def corrupt(rng, ref, rate):
    return " ".join(w if rng.random() > rate else rng.choice(WORDS) for w in ref.split())


@pytest.fixture(scope="module")
def refs():
    rng = random.Random(0)
    return {pair: [sentence(rng) for _ in range(60)] for pair in DIRECTIONS}


def write_generate(eval_dir, hyps):
    eval_dir.mkdir(parents=True, exist_ok=True)
    for pair, lines in hyps.items():
        # fairseq-generate order is not id order: the report aligns by id
        order = list(range(len(lines)))[::-1]
        text = "".join(f"S-{i}\tsrc\nH-{i}\t-0.5\t{lines[i]}\nD-{i}\t-0.5\t{lines[i]}\n" for i in order)
        (eval_dir / f"generate.test.{pair}.txt").write_text(text)


def train_log(updates, losses, wps=1000.0, wpb=3000.0):
    lines = ["== 2026-11-27 10:00:00 threads=1 parallel=2"]
    for i, (u, loss) in enumerate(zip(updates, losses)):
        lines.append(f'2026-11-27 10:{i:02d}:00 | INFO | train_inner | {{"epoch": 1, "loss": "{loss + 0.5}", '
                     f'"wps": "{wps}", "wpb": "{wpb}", "num_updates": "{u}", "wall": "{60.0 * (i + 1)}"}}')
        lines.append(f'2026-11-27 10:{i:02d}:10 | INFO | valid | {{"epoch": 1, "valid_loss": "{loss}", '
                     f'"valid_nll_loss": "{loss - 0.3}", "valid_num_updates": "{u}"}}')
    return "\n".join(lines) + "\n"


def make_run(out, config, seed, refs, rate, losses, raw_bleu=None):
    """A finished run: train.log, eval/ (results.json + generate files) and its record."""
    rng = random.Random(f"{config}-{seed}")  # str seeds are not salted: the same data every run
    save = out / config / f"seed{seed}"
    hyps = {pair: [corrupt(rng, r, rate) for r in refs[pair]] for pair in DIRECTIONS}
    write_generate(save / "eval", hyps)
    import sacrebleu

    rows = [{"direction": pair, "bleu": round(sacrebleu.corpus_bleu(hyps[pair], [refs[pair]]).score, 2),
             "signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"} for pair in DIRECTIONS]
    (save / "eval" / "results.json").write_text(json.dumps(rows))
    (save / "train.log").write_text(train_log([50, 100], losses))
    report.main(["record", str(save), "--config", config, "--seed", str(seed)])
    return hyps


@pytest.fixture()
def raw_dir(tmp_path, refs):
    raw = tmp_path / "raw"
    raw.mkdir()
    for pair, lines in refs.items():
        (raw / f"test.{pair.split('-')[1]}").write_text("\n".join(lines) + "\n")
    return raw


def test_bleu_from_summed_statistics_is_sacrebleus_corpus_bleu(tmp_path, refs, raw_dir):
    import sacrebleu

    hyps = make_run(tmp_path, "moe_top2", 1, refs, 0.3, [6.0, 5.0])
    stats = study_stats.sentence_stats(tmp_path / "moe_top2" / "seed1" / "eval", raw_dir)
    assert stats.shape == (180, 10)
    pooled_h = [h for p in DIRECTIONS for h in hyps[p]]
    pooled_r = [r for p in DIRECTIONS for r in refs[p]]
    assert study_stats.corpus_bleu(stats.sum(0)) == pytest.approx(sacrebleu.corpus_bleu(pooled_h, [pooled_r]).score)


def test_record_reads_the_log_and_the_bleu(tmp_path, refs):
    make_run(tmp_path, "dense", 2, refs, 0.2, [6.5, 5.5])
    rec = json.loads((tmp_path / "dense" / "seed2" / "record.json").read_text())
    assert (rec["config"], rec["seed"], rec["updates"], rec["minutes"]) == ("dense", 2, 100, 2.0)
    assert rec["wps"] == 1000.0 and (rec["threads"], rec["parallel"]) == (1, 2)
    assert [p["updates"] for p in rec["valid"]] == [50, 100] and rec["valid"][-1]["loss"] == 5.5
    assert set(rec["bleu"]) == set(DIRECTIONS) and rec["signature"].startswith("nrefs:1")


def test_words_per_second_weights_each_interval_by_its_time(tmp_path):
    """Two intervals of 25 updates at 1000 and 3000 words/s, 3000 words each: 150k words in 100 s."""
    log = tmp_path / "train.log"
    log.write_text('x | INFO | train_inner | {"wps": "1000", "wpb": "3000", "num_updates": "25", "wall": "75"}\n'
                   'x | INFO | train_inner | {"wps": "3000", "wpb": "3000", "num_updates": "50", "wall": "100"}\n')
    assert study_records.train_summary(log)["wps"] == 1500.0


def test_a_resumed_log_counts_each_update_once_and_every_segment_s_minutes(tmp_path):
    """Stopped after update 75 (checkpoint at 50), resumed: the second segment replays update 75
    (at another speed), its `wall` stays at 0 as fairseq 0.12's does after a resume within an
    epoch, so its time comes from the timestamps; the validation at 50 is in both segments."""
    def line(clock, tag, **kv):
        return f"2026-12-03 {clock} | INFO | {tag} | " + json.dumps({k: str(v) for k, v in kv.items()}) + "\n"
    log = tmp_path / "train.log"
    log.write_text(line("10:01:15", "train_inner", wps=1000, wpb=3000, num_updates=25, wall=75)
                   + line("10:02:30", "train_inner", wps=1000, wpb=3000, num_updates=50, wall=150)
                   + line("10:02:40", "valid", loss=6.0, num_updates=50)
                   + line("10:03:55", "train_inner", wps=1000, wpb=3000, num_updates=75, wall=225)
                   + "2026-12-03 11:00:00 | INFO | fairseq.trainer | Loaded checkpoint x/checkpoint_last.pt "
                     "(epoch 1 @ 50 updates)\n"
                   + line("11:02:30", "train_inner", wps=500, wpb=3000, num_updates=75, wall=0, train_wall=150)
                   + line("11:02:40", "valid", loss=6.0, num_updates=50)
                   + line("11:03:05", "train_inner", wps=3000, wpb=3000, num_updates=100, wall=0, train_wall=25)
                   + line("11:03:15", "valid", loss=5.0, num_updates=100))
    summary = study_records.train_summary(log)
    # 300k words: 225 s in updates 1-75 of the first segment, 25 s in 76-100 of the second
    assert summary["wps"] == 1200.0
    # 225 s, then 150 s before the segment's first line and 35 s from it to its last
    assert summary["minutes"] == round((225 + 150 + 35) / 60, 2) and summary["updates"] == 100
    assert [(p["updates"], p["loss"]) for p in summary["valid"]] == [(50, 6.0), (100, 5.0)]


def test_bootstrap_finds_a_real_difference_and_not_a_fake_one():
    import numpy as np

    rng = np.random.default_rng(1)

    def system(quality, seeds=3, n=300):
        out = []
        for s in range(seeds):
            total = rng.integers(8, 15, size=(n, 1))
            lens = total + np.arange(4)[None, :] * -1
            correct = (lens * (quality + 0.02 * s + rng.normal(0, 0.05, size=(n, 4)))).clip(0).round().astype(int)
            correct = np.minimum(correct, lens)
            out.append(np.hstack([total, total, correct, lens]).astype(np.int64))
        return out

    base, better, same = system(0.5), system(0.62), system(0.5)
    d, lo, hi, p = study_stats.hierarchical_bootstrap(better, base, samples=300)
    assert d > 3 and lo > 0 and p < 0.01
    d, lo, hi, p = study_stats.hierarchical_bootstrap(same, base, samples=300)
    assert lo < 0 < hi and p > 0.05
    # identical systems: zero difference, and a p-value of 1 (no resample says otherwise)
    d, lo, hi, p = study_stats.hierarchical_bootstrap(base, base, samples=100)
    assert d == 0 and p == 1.0


def test_equal_time_update_and_time_to_loss():
    assert study_records.equal_time_update(1000, 0.87) == 850  # rounded down to the checkpoint grid
    assert study_records.equal_time_update(1000, 0.999) == 950
    assert study_records.equal_time_update(1000, 0.01) == 50
    curve = [{"updates": 100, "loss": 8.0}, {"updates": 200, "loss": 6.0}, {"updates": 300, "loss": 5.0}]
    # 7.0 is reached half-way between updates 100 and 200: 150 updates at 0.5 updates/s = 5 minutes
    assert study_stats.time_to_loss(curve, 7.0, 0.5) == pytest.approx(5.0)
    assert study_stats.time_to_loss(curve, 9.0, 1.0) == pytest.approx(100 / 60)
    assert study_stats.time_to_loss(curve, 4.0, 1.0) is None


def test_report_writes_study_json_tables_and_plots(tmp_path, refs, raw_dir):
    out = tmp_path / "study"
    for seed in (1, 2, 3):
        make_run(out, "fairseq_dense", seed, refs, 0.35, [6.0, 5.0 + 0.01 * seed])
        make_run(out, "moe_top2", seed, refs, 0.15, [5.8, 4.8 + 0.01 * seed])
    (out / "throughput.json").write_text(json.dumps({
        "anchor": "fairseq_dense", "rounds": 3, "threads": 2, "date": "2026-11-27 14:23", "conditions": "a test host",
        "configs": {"fairseq_dense": {"ups": 0.5, "wps": 1700, "ratio": 1.0},
                    "moe_top2": {"ups": 0.6, "wps": 2000, "ratio": 1.2}},
        "raw": {"fairseq_dense": [{"round": r, "ups": u} for r, u in enumerate((0.5, 0.4, 0.5))],
                "moe_top2": [{"round": r, "ups": u} for r, u in enumerate((0.6, 0.6, 0.55))]}}))
    report.main(["equal-time", str(out), "--data", "unused"])  # faster than the anchor: its final checkpoint
    # throughput measured again: records read at the old ratio are read again, the others kept
    speed = json.loads((out / "throughput.json").read_text())
    speed["configs"]["moe_top2"]["ratio"] = 1.25
    (out / "throughput.json").write_text(json.dumps(speed))
    report.main(["equal-time", str(out), "--data", "unused"])
    for seed in (1, 2, 3):
        rec = json.loads((out / "moe_top2" / f"seed{seed}" / "record.json").read_text())
        assert rec["equal_time"]["ratio"] == 1.25 and rec["equal_time"]["capped"]
    results = tmp_path / "results.md"
    results.write_text(f"# Study\n\nprose kept\n\n{report.BEGIN}\nold numbers\n{report.END}\n\nmore prose\n")
    study_json = tmp_path / "study.json"
    readme = tmp_path / "README.md"
    readme.write_text(f"# Project\n\n{report.README_BEGIN}\nstale summary\n{report.README_END}\n\n## Papers\n")
    report.main(["report", str(out), "--raw-dir", str(raw_dir), "--json", str(study_json),
                 "--results-md", str(results), "--readme", str(readme), "--samples", "200"])
    study = json.loads(study_json.read_text())
    assert study["signature"].startswith("nrefs:1") and study["anchor"] == "fairseq_dense"
    assert len(study["runs"]) == 6
    for run in study["runs"]:
        assert {"config", "seed", "minutes", "updates", "wps", "bleu"} <= set(run)
        assert set(run["bleu"]) == set(DIRECTIONS) and all(isinstance(v, float) for v in run["bleu"].values())
        assert run["equal_time"]["updates"] == 100
    [cmp] = [c for c in study["comparisons"] if c["kind"] == "equal_updates"]
    assert (cmp["config"], cmp["baseline"]) == ("moe_top2", "fairseq_dense") and cmp["delta"] > 5 and cmp["p"] < 0.05
    # the README's summary: one row per config with its seed count, and the verdicts against the anchor
    summary = readme.read_text()
    assert "stale summary" not in summary and summary.startswith("# Project") and summary.endswith("## Papers\n")
    assert "| `moe_top2` | 8 experts" in summary and "| `fairseq_dense` | plain fairseq" in summary
    assert f"- `moe_top2` at equal updates: {cmp['delta']:+.2f}" in summary
    assert "`moe_top2` 1.250x" in summary
    text = results.read_text()
    assert "prose kept" in text and "more prose" in text and "old numbers" not in text
    assert "| moe_top2 − fairseq_dense |" in text and "| fairseq_dense | 3 | 100 |" in text
    # the speed table names the conditions and shows every round's ratio beside the median
    assert "a test host; 2026-11-27 14:23" in text and "| 1.20, 1.50, 1.10 |" in text
    for png in ("study_convergence_updates.png", "study_convergence_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_refuses_a_results_file_without_the_generated_section(tmp_path, refs, raw_dir):
    out = tmp_path / "study"
    make_run(out, "fairseq_dense", 1, refs, 0.3, [6.0, 5.0])
    md = tmp_path / "results.md"
    md.write_text("# no markers\n")
    from moe_fairseq.moe.errors import MoEUsageError

    with pytest.raises(MoEUsageError, match="no generated section"):
        report.main(["report", str(out), "--raw-dir", str(raw_dir), "--json", str(tmp_path / "s.json"),
                     "--results-md", str(md), "--samples", "100"])
    assert md.read_text() == "# no markers\n"


def test_average_reads_every_run_again_with_its_last_checkpoints_averaged(tmp_path, refs, raw_dir, monkeypatch):
    """`average` averages exactly the interval checkpoints U, U - 50, ... of each run at its final
    and its equal-time update, evaluates the mean, deletes it, and skips on a rerun; the report
    then compares the averaged readings."""
    out = tmp_path / "study"
    for seed in (1, 2):
        make_run(out, "fairseq_dense", seed, refs, 0.35, [6.0, 5.0])
        make_run(out, "moe_top2", seed, refs, 0.35, [5.8, 4.8])
        for config in ("fairseq_dense", "moe_top2"):
            for u in (50, 100, 150):  # interval checkpoints; the log's final update is 100
                (out / config / f"seed{seed}" / f"checkpoint_{u // 100 + 1}_{u}.pt").write_text(f"{config} {u}")
    (out / "throughput.json").write_text(json.dumps({
        "anchor": "fairseq_dense", "rounds": 1, "threads": 2,
        "configs": {"fairseq_dense": {"ups": 0.5, "wps": 1700, "ratio": 1.0},
                    "moe_top2": {"ups": 0.6, "wps": 2000, "ratio": 1.2}}}))
    report.main(["equal-time", str(out), "--data", "unused", "--run", "moe_top2/seed1"])
    assert [(r["config"], r["seed"]) for r in study_records.load_records(out) if "equal_time" in r] == [("moe_top2", 1)]
    report.main(["equal-time", str(out), "--data", "unused"])  # all read at their final update
    calls = []

    def fake_run(cmd, check, stdout, env=None):
        calls.append(cmd)
        if cmd[0] == "moe-average":
            # the "average" names its inputs; the fake evaluation scores it by them
            out_path = Path(cmd[cmd.index("--output") + 1])
            out_path.write_text("\n".join(Path(i).read_text() for i in cmd[cmd.index("--inputs") + 1:cmd.index("--output")]))
        elif cmd[0] == "moe-evaluate":
            inputs = Path(cmd[cmd.index("--path") + 1]).read_text().splitlines()
            config = inputs[0].split()[0]
            assert [int(line.split()[1]) for line in inputs] == [100, 50]  # U, U - 50: --last 2
            eval_dir = Path(cmd[cmd.index("--out") + 1])
            rng = random.Random(len(calls))
            # averaging helps the MoE runs here and not the anchor's
            hyps = {pair: [corrupt(rng, r, 0.1 if config == "moe_top2" else 0.35) for r in refs[pair]]
                    for pair in DIRECTIONS}
            write_generate(eval_dir, hyps)
            (eval_dir / "results.json").write_text(json.dumps([{"direction": pair, "bleu": 50.0, "signature": "s"}
                                                                for pair in DIRECTIONS]))
        else:
            raise AssertionError(cmd)

    monkeypatch.setattr(study_records.subprocess, "run", fake_run)
    # --run: one run read the moment it lands, the others untouched
    report.main(["average", str(out), "--data", "unused", "--last", "2", "--run", "moe_top2/seed2"])
    assert [c[0] for c in calls] == ["moe-average", "moe-evaluate"]
    assert calls[1][calls[1].index("--out") + 1] == str(out / "moe_top2" / "seed2" / "eval_avg2_u100")
    assert [(r["config"], r["seed"]) for r in study_records.load_records(out) if "averaged" in r] == [("moe_top2", 2)]
    with pytest.raises(MoEUsageError, match="--run moe_top2/seed9: no .*record.json"):
        report.main(["average", str(out), "--data", "unused", "--last", "2", "--run", "moe_top2/seed9"])
    calls.clear()
    report.main(["average", str(out), "--data", "unused", "--last", "2"])
    # one average and one evaluation per remaining run: final and equal-time updates coincide here
    assert sorted(c[0] for c in calls) == ["moe-average"] * 3 + ["moe-evaluate"] * 3
    for config in ("fairseq_dense", "moe_top2"):
        save = out / config / "seed1"
        rec = json.loads((save / "record.json").read_text())
        assert rec["averaged"] == {"last": 2, "final": {"updates": 100, "bleu": dict.fromkeys(DIRECTIONS, 50.0)},
                                   "equal_time": {"updates": 100, "bleu": dict.fromkeys(DIRECTIONS, 50.0)}}
        assert not list(save.glob("average*.pt"))  # the averaged checkpoint is not kept
    calls.clear()
    report.main(["average", str(out), "--data", "unused", "--last", "2"])
    assert calls == []  # nothing new to read
    study_json = tmp_path / "study.json"
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.README_BEGIN}\n{report.README_END}\n")
    report.main(["report", str(out), "--raw-dir", str(raw_dir), "--json", str(study_json), "--readme", str(readme),
                 "--samples", "200"])
    study = json.loads(study_json.read_text())
    assert study["averaged_last"] == 2
    by_kind = {c["kind"]: c for c in study["comparisons"]}
    # single checkpoints alike (same corruption rate), averaged ones far apart
    assert abs(by_kind["equal_updates"]["delta"]) < 8
    assert by_kind["equal_updates_avg"]["delta"] > 15 and by_kind["equal_time_avg"]["delta"] > 15
    text = (out / "report.md").read_text()
    assert "**With the last 2 interval checkpoints averaged**" in text and "U − 50 .. U" in text
    summary = readme.read_text()
    assert "pooled at equal wall-clock, last 2 averaged |" in summary
    assert "- `moe_top2` at equal wall-clock, last 2 checkpoints averaged: +" in summary


def test_report_shows_the_averaged_readings_of_the_configs_that_have_them(tmp_path, refs, raw_dir):
    """Runs that land one by one: a config whose runs are all averaged is reported averaged, one
    that is not yet is marked so and left out of the averaged comparisons (never an averaged run
    against a single checkpoint); runs averaged over different numbers of checkpoints are not
    reported averaged at all."""
    out = tmp_path / "study"
    for config, seed in (("fairseq_dense", 1), ("moe_top2", 1), ("moe_top2", 2)):
        make_run(out, config, seed, refs, 0.3, [6.0, 5.0])

    def average(config, last, seed=1):
        save = out / config / f"seed{seed}"
        make_eval(save / f"eval_avg{last}_u100", refs, 0.2, f"avg-{config}-{seed}")
        rec = json.loads((save / "record.json").read_text())
        rec["averaged"] = {"last": last, "final": {"updates": 100, "bleu": rec["bleu"]}}
        (save / "record.json").write_text(json.dumps(rec))

    def reported():
        report.main(["report", str(out), "--raw-dir", str(raw_dir), "--json", str(tmp_path / "s.json"),
                     "--samples", "50", "--no-figures"])
        return (out / "report.md").read_text(), json.loads((tmp_path / "s.json").read_text())

    average("moe_top2", 2)
    text, summary = reported()
    assert "averaged" not in text  # not one config with every seed averaged
    average("moe_top2", 2, seed=2)
    text, summary = reported()
    assert "| fairseq_dense | not read yet | - | - |" in text and "| moe_top2 | **" in text
    assert "Differences with averaging" not in text  # no pair to compare: no empty table
    assert summary["averaged_last"] == 2
    assert [c["kind"] for c in summary["comparisons"]] == ["equal_updates"]  # no averaged pair yet
    average("fairseq_dense", 2)
    text, summary = reported()
    assert "not read yet" not in text
    assert [c["kind"] for c in summary["comparisons"]] == ["equal_updates", "equal_updates_avg"]
    average("fairseq_dense", 3)
    text, summary = reported()
    assert "averaged" not in text and "averaged_last" not in summary


def test_average_refuses_a_missing_checkpoint_and_a_window_of_one(tmp_path):
    from moe_fairseq.moe.errors import MoEUsageError

    (tmp_path / "checkpoint_2_100.pt").write_text("")
    (tmp_path / "checkpoint_1_50.pt").write_text("")
    assert study_records.averaged_inputs(tmp_path, 100, 2) == [tmp_path / "checkpoint_2_100.pt", tmp_path / "checkpoint_1_50.pt"]
    with pytest.raises(MoEUsageError, match="no interval checkpoint at update 0"):
        study_records.averaged_inputs(tmp_path, 100, 3)
    (tmp_path / "checkpoint_1_100.pt").unlink(missing_ok=True)
    (tmp_path / "checkpoint_2_100.pt").unlink()
    with pytest.raises(MoEUsageError, match="no interval checkpoint at update 100"):
        study_records.averaged_inputs(tmp_path, 100, 2)
    with pytest.raises(MoEUsageError, match="--last must be >= 2"):
        report.main(["average", str(tmp_path), "--data", "unused", "--last", "1"])


def test_smoe_schedule_cost_is_the_mean_over_its_updates():
    tp = study_throughput
    args = tp.config_args("smoe_dropout")
    steps, total = int(tp.flag(args, "--moe-top-k-schedule-steps")), int(tp.flag(args, "--max-update"))
    per_k = {1: 1.0, 2: 1.2, 4: 1.6, 8: 2.4}  # linear in k: the interpolation is exact
    from moe_fairseq.moe.k_schedule import KSchedule

    sched = KSchedule(1, 8, steps, "linear")
    brute = sum(1.0 + 0.2 * (sched(t) - 1) for t in range(total)) / total
    assert tp.schedule_cost("smoe_dropout", per_k) == pytest.approx(brute)
    assert [label for label, _ in tp.variants("smoe_dropout")] == [f"smoe_dropout@k{k}" for k in (1, 2, 4, 8)]
    assert tp.variants("moe_top2") == [("moe_top2", [])]
    assert tp.flag(["--a", "1", "--a", "2"], "--a") == "2"  # the last value wins, as in argparse


def test_throughput_rounds_resume_and_named_runs_carry_their_flags(tmp_path, monkeypatch):
    """Named runs (NAME=CONFIG:FLAG,VALUE) are timed with their flags and keyed by NAME; rounds are
    stored as they land, a rerun adds only the missing ones, and a file of another measurement is
    refused rather than mixed in.  The ratio is the median of per-round ratios to the anchor."""
    from moe_fairseq.moe.errors import MoEUsageError

    tp = study_throughput
    assert tp.parse_spec("gd=moe_top2_gate_drop:--moe-gating-dropout,0.1") == (
        "gd", "moe_top2_gate_drop", ["--moe-gating-dropout", "0.1"])
    assert tp.parse_spec("moe_top2") == ("moe_top2", "moe_top2", [])
    assert tp.config_names("a,b") == ["a", "b"]
    assert tp.config_names("x=a:--f,1 y=b") == ["x=a:--f,1", "y=b"]
    speeds = {"fairseq_dense": [1.0, 2.0, 1.0], "gd": [1.5, 2.0, 3.0]}
    calls = []

    def fake_measure(data, spec, extra, warmup, updates, threads, rate_mbit=None):
        name, _, flags = tp.parse_spec(spec)
        calls.append((name, flags, extra, rate_mbit))
        r = sum(1 for c in calls if c[0] == name) - 1
        return speeds[name][r], 100.0 * speeds[name][r]

    monkeypatch.setattr(tp, "measure", fake_measure)
    out = tmp_path / "tp.json"
    argv = ["--data", "d", "--configs", "fairseq_dense=fairseq_dense gd=moe_top2_gate_drop:--moe-gating-dropout,0.1",
            "--out", str(out), "--rounds", "3", "--warmup", "5", "--updates", "10", "--threads", "1",
            "--emulated-rate-mbit", "250", "--extra", "--max-tokens 2048"]
    first = tp.main(argv + ["--rounds-now", "2"])
    assert first["rounds"] == 2 and len(calls) == 4
    assert ("gd", ["--moe-gating-dropout", "0.1"], ["--max-tokens", "2048"], 250.0) in calls
    assert first["configs"]["gd"]["ratio"] == pytest.approx((1.5 + 1.0) / 2)  # median of 1.5 and 1.0
    final = tp.main(argv)
    assert final["rounds"] == 3 and len(calls) == 6  # only round 3 was measured
    assert final["configs"]["gd"]["ratio"] == pytest.approx(1.5)  # median of 1.5, 1.0, 3.0
    assert final["configs"]["fairseq_dense"]["ratio"] == 1.0
    with pytest.raises(MoEUsageError, match="holds another measurement"):
        tp.main([a if a != "250" else "0" for a in argv])
    cmd = tp.emulated_command(["fairseq-train", "data", "--adam-betas", "(0.9,0.98)"], 250, str(tmp_path))
    assert cmd[cmd.index("--rate-mbit") + 1] == "250" and "'(0.9,0.98)'" in cmd[-1]
    assert '--node_rank "$NODE_RANK"' in cmd[-1] and "--distributed-world-size 2" in cmd[-1]


def test_run_study_refuses_missing_data_and_unknown_configs(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPTS / "run_study.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "DATA": str(tmp_path / "none"), "OUT": str(tmp_path / "o")})
    assert proc.returncode == 2 and "no Multi30k data-bin" in proc.stderr
    data = tmp_path / "bin"
    data.mkdir()
    (data / "train.en-de.en.idx").write_text("")
    proc = subprocess.run(["bash", str(SCRIPTS / "run_study.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "DATA": str(data), "OUT": str(tmp_path / "o"), "RUNS": "nope"})
    assert proc.returncode == 2 and "configs/multi30k/nope.args" in proc.stderr
    proc = subprocess.run(["bash", str(SCRIPTS / "run_study.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "DATA": str(data), "OUT": str(tmp_path / "o"), "AVERAGE": "1"})
    assert proc.returncode == 2 and "AVERAGE must be 0" in proc.stderr


def make_screen(out, name, spec, refs, rate, loss, updates=50):
    """A finished scripts/screen_recipe.sh run: overrides.txt, train.log, eval/ and its record."""
    save = out / name / "seed1"
    hyps = make_eval(save / "eval", refs, rate, f"screen-{name}")
    (save / "overrides.txt").write_text(spec + "\n")
    (save / "train.log").write_text(train_log([updates], [loss]))
    report.main(["record", str(save), "--config", name, "--seed", "1"])
    return hyps


def make_eval(eval_dir, refs, rate, salt):
    import sacrebleu

    rng = random.Random(salt)
    hyps = {pair: [corrupt(rng, r, rate) for r in refs[pair]] for pair in DIRECTIONS}
    write_generate(eval_dir, hyps)
    rows = [{"direction": pair, "bleu": round(sacrebleu.corpus_bleu(hyps[pair], [refs[pair]]).score, 2),
             "signature": "s"} for pair in DIRECTIONS]
    (eval_dir / "results.json").write_text(json.dumps(rows))
    return hyps


def pooled_bleu(hyps, refs):
    """Brute force: sacrebleu's corpus BLEU over the three test sets concatenated."""
    import sacrebleu

    return sacrebleu.corpus_bleu([h for p in DIRECTIONS for h in hyps[p]], [[r for p in DIRECTIONS for r in refs[p]]]).score


def test_sweep_reads_each_candidate_beside_its_base_config_at_the_same_update(tmp_path, refs, raw_dir, monkeypatch):
    """`sweep` evaluates the study's seed-1 run of each base config at the screening update once
    (eval_uU, kept), and reports every candidate's difference to it in pooled BLEU and loss."""
    study, screen = tmp_path / "study", tmp_path / "screen"
    make_run(study, "moe_top2", 1, refs, 0.35, [5.8, 4.8])  # validated at 50 and 100
    (study / "moe_top2" / "seed1" / "checkpoint_1_50.pt").write_text("")
    make_run(study, "moe_top2", 2, refs, 0.35, [5.9, 4.9])  # other seeds are not references
    better = make_screen(screen, "top2_lr", "moe_top2 --lr 0.003", refs, 0.1, 5.5)
    worse = make_screen(screen, "top2_freq2", "moe_top2 --moe-freq 2", refs, 0.5, 6.1)
    make_screen(screen, "switch", "moe_top1", refs, 0.2, 5.7)  # no study run of moe_top1: no reference
    calls = []

    def fake_run(cmd, check, stdout, env=None):
        calls.append(cmd)
        assert cmd[0] == "moe-evaluate" and cmd[cmd.index("--path") + 1].endswith("moe_top2/seed1/checkpoint_1_50.pt")
        calls.append(make_eval(Path(cmd[cmd.index("--out") + 1]), refs, 0.3, "reference"))

    monkeypatch.setattr(study_records.subprocess, "run", fake_run)
    results = tmp_path / "results.md"
    begin, end = report.sweep_markers(50)
    results.write_text(f"# prose\n{begin}\nold\n{end}\nmore prose\n")
    argv = ["sweep", str(screen), "--study", str(study), "--data", "unused", "--raw-dir", str(raw_dir),
            "--results-md", str(results)]
    table = report.main(argv)
    assert calls[0][calls[0].index("--out") + 1] == str(study / "moe_top2" / "seed1" / "eval_u50")
    ref = calls[1]
    sweep = json.loads((screen / "sweep.json").read_text())
    assert sweep["updates"] == 50
    by_name = {r["name"]: r for r in sweep["runs"]}
    assert by_name["moe_top2 (study, seed 1)"]["valid_loss"] == 5.8  # the study run's loss at update 50
    for name, hyps in (("top2_lr", better), ("top2_freq2", worse)):
        assert by_name[name]["pooled"] == pytest.approx(pooled_bleu(hyps, refs), abs=0.01)
        delta = round(by_name[name]["pooled"], 2) - round(pooled_bleu(ref, refs), 2)
        assert f"{delta:+.2f} BLEU" in table
    assert by_name["top2_lr"]["pooled"] > by_name["moe_top2 (study, seed 1)"]["pooled"] > by_name["top2_freq2"]["pooled"]
    assert "| top2_lr | `moe_top2` | `--lr 0.003` | 5.500 |" in table and "-0.300 loss" in table
    switch = next(line for line in table.splitlines() if line.startswith("| switch |"))
    assert switch.startswith("| switch | `moe_top1` | `-` | 5.700 |") and switch.endswith("|  |")  # no reference
    text = results.read_text()
    assert text.startswith("# prose\n") and text.endswith("more prose\n") and "old" not in text and "top2_lr" in text
    calls.clear()
    report.main(argv)
    assert calls == []  # the reference evaluation is kept
    make_screen(screen, "short", "moe_top2 --dropout 0.1", refs, 0.3, 6.0, updates=100)
    with pytest.raises(MoEUsageError, match=r"different updates \[50, 100\]"):
        report.main(argv)
    (screen / "short" / "seed1" / "overrides.txt").unlink()
    with pytest.raises(MoEUsageError, match="no overrides.txt"):
        report.main(argv)


def test_screen_recipe_trains_the_config_with_its_overrides_then_evaluates(tmp_path, raw_dir):
    """scripts/screen_recipe.sh with stand-ins for fairseq-train and moe-evaluate: the overriding
    flags come after the config's, the budget and seed after them; finished steps are skipped;
    a NAME reused with other flags and bad arguments are refused in one line."""
    out = tmp_path / "screen"
    data, bin_dir, env = stand_in_study(tmp_path, raw_dir)
    env.update({"OUT": str(out), "SCREEN_UPDATES": "50"})

    def screen(*args, **extra):
        return subprocess.run(["bash", str(SCRIPTS / "screen_recipe.sh"), *args], capture_output=True, text=True,
                              env={**env, **extra})

    proc = screen("top2_lr", "moe_top2", "--lr", "0.003")
    assert proc.returncode == 0, proc.stderr
    call = (bin_dir / "train.calls").read_text().split()
    config = [line for line in (REPO / "configs/multi30k/moe_top2.args").read_text().split("\n")
              if line and not line.startswith("#")]
    assert call[:3] == [str(data), "--user-dir", str(REPO / "moe_fairseq")]
    assert call[3:3 + len(" ".join(config).split())] == " ".join(config).split()
    rest = call[3 + len(" ".join(config).split()):]
    assert rest[:6] == ["--lr", "0.003", "--max-update", "50", "--seed", "1"]
    save = out / "top2_lr" / "seed1"
    rec = json.loads((save / "record.json").read_text())
    assert rec["config"] == "top2_lr" and rec["updates"] == 50 and rec["bleu"] == {d: 100.0 for d in DIRECTIONS}
    assert rec["flags"] == call[3:call.index("--save-dir")]
    assert (save / "overrides.txt").read_text() == "moe_top2 --lr 0.003\n"
    assert (bin_dir / "eval.calls").read_text().split()[:2] == ["--path", str(save / "checkpoint_last.pt")]
    assert screen("top2_lr", "moe_top2", "--lr", "0.003").returncode == 0  # a rerun trains nothing
    assert len((bin_dir / "train.calls").read_text().splitlines()) == 1
    assert len((bin_dir / "eval.calls").read_text().splitlines()) == 1
    # the anchor is plain fairseq: no --user-dir
    assert screen("dense_do", "fairseq_dense", "--dropout", "0.1").returncode == 0
    assert (bin_dir / "train.calls").read_text().splitlines()[-1].split()[1] == "--task"
    for args, extra, message in (
            (("top2_lr", "moe_top2", "--lr", "0.001"), {}, "was screened as 'moe_top2 --lr 0.003'"),
            (("top2_lr",), {}, "usage: screen_recipe.sh NAME CONFIG"),
            (("a/b", "moe_top2"), {}, "NAME must be letters"),
            (("x", "nope"), {}, "no configs/multi30k/nope.args"),
            (("x", "moe_top2"), {"SCREEN_UPDATES": "0"}, "SCREEN_UPDATES must be a positive number"),
            (("x", "moe_top2"), {"DATA": str(tmp_path / "none")}, "no Multi30k data-bin")):
        proc = screen(*args, **extra)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def stand_in_study(tmp_path, raw_dir):
    """A data-bin (with raw/ references) and stand-ins for fairseq-train and moe-evaluate that log
    their arguments to BIN/train.calls and BIN/eval.calls: the train one writes a fairseq json log,
    the evaluate one copies the references as its hypotheses.  Returns (data, bin dir, env)."""
    import sys

    data, bin_dir = tmp_path / "bin", tmp_path / "fake"
    data.mkdir()
    (data / "train.en-de.en.idx").write_text("")
    (data / "raw").symlink_to(raw_dir)
    write_tools(bin_dir, moe_evaluate=MOE_EVALUATE, fairseq_train=(
        "#!/bin/bash\n"
        'echo "$*" >> "$(dirname "$0")/train.calls"\n'
        'echo "2026-11-28 06:00:00 | INFO | train_inner | {\\"num_updates\\": \\"50\\", \\"loss\\": \\"6\\", '
        '\\"wps\\": \\"1000\\", \\"wpb\\": \\"3000\\", \\"wall\\": \\"60\\"}"\n'
        'echo "2026-11-28 06:00:01 | INFO | valid | {\\"valid_loss\\": \\"5.5\\", \\"valid_num_updates\\": \\"50\\"}"\n'))
    env = {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin", "DATA": str(data), "THREADS": "1",
           "PYTHONPATH": str(REPO)}
    return data, bin_dir, env


def test_run_study_trains_in_rotation_the_anchor_without_the_plugin_and_skips_finished_runs(tmp_path, raw_dir):
    """scripts/run_study.sh with stand-ins for fairseq-train and moe-evaluate: seed 1 of every
    config before seed 2, each run its config's flags then its seed, the anchor without
    --user-dir, every run evaluated and recorded into study.json; a rerun trains nothing."""
    out = tmp_path / "study"
    data, bin_dir, env = stand_in_study(tmp_path, raw_dir)
    env.update({"OUT": str(out), "RUNS": "fairseq_dense moe_top2", "SEEDS": "1 2", "PARALLEL": "1",
                "SKIP_THROUGHPUT": "1", "AVERAGE": "0"})

    def study():
        return subprocess.run(["bash", str(SCRIPTS / "run_study.sh")], capture_output=True, text=True, env=env)

    proc = study()
    assert proc.returncode == 0, proc.stderr
    calls = [c.split() for c in (bin_dir / "train.calls").read_text().splitlines()]
    saves = [c[c.index("--save-dir") + 1] for c in calls]
    assert saves == [str(out / c / f"seed{s}") for s in (1, 2) for c in ("fairseq_dense", "moe_top2")]
    for call, (config, seed) in zip(calls, [(c, s) for s in (1, 2) for c in ("fairseq_dense", "moe_top2")]):
        flags = " ".join(line for line in (REPO / f"configs/multi30k/{config}.args").read_text().split("\n")
                         if line and not line.startswith("#")).split()
        plugin = [] if config == "fairseq_dense" else ["--user-dir", str(REPO / "moe_fairseq")]
        assert call[:1 + len(plugin) + len(flags)] == [str(data), *plugin, *flags]
        assert call[call.index("--seed", len(plugin) + len(flags)) + 1] == str(seed)
        assert call[-5:] == ["--save-dir", str(out / config / f"seed{seed}"), "--cpu", "--num-workers", "0"]
    assert len((bin_dir / "eval.calls").read_text().splitlines()) == 4
    study_json = json.loads((out / "study.json").read_text())
    assert sorted((r["config"], r["seed"]) for r in study_json["runs"]) == [
        ("fairseq_dense", 1), ("fairseq_dense", 2), ("moe_top2", 1), ("moe_top2", 2)]
    assert all(r["bleu"] == {d: 100.0 for d in DIRECTIONS} and r["updates"] == 50 for r in study_json["runs"])
    # each run's record carries the flags it was trained with (the configs change between studies)
    for r, call in zip(sorted(study_json["runs"], key=lambda r: (r["seed"], r["config"])), calls):
        assert r["flags"] == call[1 + (r["config"] != "fairseq_dense") * 2:call.index("--save-dir")]
    # an interrupted run (trained, not recorded) is only evaluated and recorded on a rerun
    (out / "moe_top2" / "seed2" / "record.json").unlink()
    (out / "moe_top2" / "seed2" / "eval" / "results.json").unlink()
    proc = study()
    assert proc.returncode == 0, proc.stderr
    assert len((bin_dir / "train.calls").read_text().splitlines()) == 4
    assert len((bin_dir / "eval.calls").read_text().splitlines()) == 5
    assert (out / "moe_top2" / "seed2" / "record.json").is_file()


def test_archive_keeps_what_the_report_reads_and_the_report_from_it_is_the_same(tmp_path, refs, raw_dir):
    """`archive` copies records, flags and every evaluation's hypotheses (gzipped, in sentence
    order) but no checkpoint or log; `report` on the archive writes the same study.json and
    tables as on the study itself; a rerun gives the same bytes; a reading that does not match
    the references and a second throughput measurement are refused."""
    import gzip

    out, archive = tmp_path / "study", tmp_path / "archive"
    hyps = {}
    for seed in (1, 2):
        for config, rate in (("fairseq_dense", 0.35), ("moe_top2", 0.2)):
            hyps[config, seed] = make_run(out, config, seed, refs, rate, [6.0, 5.0 + 0.01 * seed])
            save = out / config / f"seed{seed}"
            (save / "checkpoint_1_50.pt").write_text("weights")
            (save / "flags.txt").write_text("--arch\ntransformer\n")
        # a second reading of the same run (the equal-time or an averaged one)
        make_eval(out / "moe_top2" / f"seed{seed}" / "eval_u50", refs, 0.3, f"u50-{seed}")
    (out / "throughput.json").write_text(json.dumps({"anchor": "fairseq_dense", "rounds": 1, "threads": 2,
                                                     "configs": {"fairseq_dense": {"ups": 0.5, "wps": 1700, "ratio": 1.0},
                                                                 "moe_top2": {"ups": 0.45, "wps": 1600, "ratio": 0.9}}}))
    report.main(["equal-time", str(out), "--data", "unused"])  # moe_top2 at 0.9x: read at update 50 (eval_u50)
    report.main(["archive", str(out), "--raw-dir", str(raw_dir), "--to", str(archive)])

    files = sorted(str(p.relative_to(archive)) for p in archive.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pt", ".log")) or "generate" in f]
    assert "throughput.json" in files and "moe_top2/seed2/flags.txt" in files
    for pair in DIRECTIONS:
        with gzip.open(archive / "fairseq_dense" / "seed1" / "eval" / f"hyp.test.{pair}.txt.gz", "rt") as f:
            assert f.read().split("\n")[:-1] == hyps["fairseq_dense", 1][pair]
        assert (archive / "moe_top2" / "seed2" / "eval_u50" / f"hyp.test.{pair}.txt.gz").is_file()

    texts = {}
    for name, source in (("study", out), ("archive", archive)):
        results = tmp_path / f"{name}.md"
        results.write_text(f"{report.BEGIN}\n{report.END}\n")
        report.main(["report", str(source), "--raw-dir", str(raw_dir), "--json", str(tmp_path / f"{name}.json"),
                     "--results-md", str(results), "--figures", str(tmp_path / name), "--samples", "100"])
        texts[name] = (json.loads((tmp_path / f"{name}.json").read_text()), results.read_text())
    assert texts["study"] == texts["archive"]
    assert [c["kind"] for c in texts["archive"][0]["comparisons"]] == ["equal_updates", "equal_time"]

    before = {f: (archive / f).read_bytes() for f in files}
    report.main(["archive", str(out), "--raw-dir", str(raw_dir), "--to", str(archive), "--run", "moe_top2/seed1"])
    assert {f: (archive / f).read_bytes() for f in files} == before

    from moe_fairseq.moe.errors import MoEUsageError

    with gzip.open(archive / "moe_top2" / "seed1" / "eval" / "hyp.test.en-fr.txt.gz", "wt") as f:
        f.write("one line\n")
    with pytest.raises(MoEUsageError, match="1 hypotheses for 60 references"):
        study_stats.sentence_stats(archive / "moe_top2" / "seed1" / "eval", raw_dir)
    speed = json.loads((out / "throughput.json").read_text())
    speed["rounds"] = 4
    (out / "throughput.json").write_text(json.dumps(speed))
    with pytest.raises(MoEUsageError, match="throughput.json differs"):
        report.main(["archive", str(out), "--raw-dir", str(raw_dir), "--to", str(archive)])


def test_run_study_archives_each_run_and_a_run_archived_is_done_on_a_new_machine(tmp_path, raw_dir):
    """ARCHIVE: every run lands in the archive as it finishes; with OUT gone (a new machine) an
    archived run is not trained again, the missing one is, and the report is made from the
    archive with every run in it."""
    data, bin_dir, env = stand_in_study(tmp_path, raw_dir)
    archive = tmp_path / "archive"
    env.update({"OUT": str(tmp_path / "study"), "RUNS": "moe_top2", "SEEDS": "1", "PARALLEL": "1",
                "SKIP_THROUGHPUT": "1", "AVERAGE": "0", "ARCHIVE": str(archive)})
    run = ["bash", str(SCRIPTS / "run_study.sh")]
    proc = subprocess.run(run, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert [p.parent.relative_to(archive).as_posix() for p in archive.rglob("record.json")] == ["moe_top2/seed1"]
    assert not list(archive.rglob("*.pt")) and not list(archive.rglob("generate.*"))

    env.update({"OUT": str(tmp_path / "new_machine"), "SEEDS": "1 2"})
    proc = subprocess.run(run, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    saves = [c.split()[c.split().index("--save-dir") + 1] for c in (bin_dir / "train.calls").read_text().splitlines()]
    assert saves == [str(tmp_path / "study" / "moe_top2" / "seed1"), str(tmp_path / "new_machine" / "moe_top2" / "seed2")]
    study_json = json.loads((tmp_path / "new_machine" / "study.json").read_text())
    assert sorted((r["config"], r["seed"]) for r in study_json["runs"]) == [("moe_top2", 1), ("moe_top2", 2)]


def test_run_study_archives_the_slimmable_curve_and_does_not_make_it_again(tmp_path, raw_dir):
    """Step 4 with ARCHIVE: the k curve made on this machine is copied to ARCHIVE/smoe_slimmable;
    on a machine that has seed 1's checkpoint but not the curve, the archived curve counts as
    done (the checkpoint here is not loadable, so evaluating it again would fail the study)."""
    data, bin_dir, env = stand_in_study(tmp_path, raw_dir)
    out, archive = tmp_path / "study", tmp_path / "archive"
    env.update({"OUT": str(out), "RUNS": "smoe_dropout", "SEEDS": "1", "PARALLEL": "1",
                "SKIP_THROUGHPUT": "1", "AVERAGE": "0", "ARCHIVE": str(archive)})
    (out / "smoe_slimmable").mkdir(parents=True)
    curve = {"ks": [1, 2], "bleu": {"1": {"en-de": 20.0}, "2": {"en-de": 25.0}}}
    (out / "smoe_slimmable" / "slimmable.json").write_text(json.dumps(curve))
    (out / "smoe_slimmable" / "slimmable.md").write_text("| k | en-de |\n")
    run = ["bash", str(SCRIPTS / "run_study.sh")]
    proc = subprocess.run(run, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((archive / "smoe_slimmable" / "slimmable.json").read_text()) == curve
    assert (archive / "smoe_slimmable" / "slimmable.md").is_file()
    assert not list((archive / "smoe_slimmable").glob(".*"))  # no temporary file left

    new = tmp_path / "new_machine"
    (new / "smoe_dropout" / "seed1").mkdir(parents=True)
    (new / "smoe_dropout" / "seed1" / "checkpoint_last.pt").write_text("not a checkpoint")
    env["OUT"] = str(new)
    proc = subprocess.run(run, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not (new / "smoe_slimmable").exists()
    # without the archived curve, the same machine does evaluate that checkpoint (and fails on it)
    (archive / "smoe_slimmable" / "slimmable.json").unlink()
    proc = subprocess.run(run, capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "slimmable_eval: error: " in proc.stderr and "checkpoint_last.pt cannot be read as a checkpoint" in proc.stderr, proc.stderr


def test_report_of_runs_named_for_their_settings_compares_each_with_the_anchor_and_the_baseline(tmp_path, refs,
                                                                                              raw_dir):
    """The emulated cluster's study names runs for their settings (gate_drop_p0.3): with --baseline
    every run is compared with the anchor and every other run with the baseline, the time to a
    loss is to the baseline's final loss (a run that never reaches it says so), and the section,
    the figures' names and the JSON key are the caller's, the JSON's other keys kept."""
    out = tmp_path / "link250mbit"
    make_run(out, "fairseq_dense", 1, refs, 0.35, [6.0, 5.0])
    make_run(out, "moe_top2", 1, refs, 0.2, [5.8, 4.8])
    make_run(out, "gate_drop_p0.3", 1, refs, 0.25, [5.9, 4.9])  # never reaches top-2's 4.8
    make_run(out, "gate_local_p0.3", 1, refs, 0.15, [5.7, 4.7])
    (out / "throughput.json").write_text(json.dumps({
        "anchor": "fairseq_dense", "rounds": 1, "threads": 1,
        "configs": {"fairseq_dense": {"ups": 0.4, "wps": 1700, "ratio": 1.0},
                    "moe_top2": {"ups": 0.2, "wps": 800, "ratio": 0.5},
                    "gate_local_p0.3": {"ups": 0.25, "wps": 900, "ratio": 0.625},
                    "gate_drop_p0.3": {"ups": 0.25, "wps": 900, "ratio": 0.625}}}))
    results = tmp_path / "results.md"
    begin, end = report.section_markers("emulated-250")
    results.write_text(f"# Results\n\n{report.BEGIN}\nthe Multi30k study\n{report.END}\n\n{begin}\nold\n{end}\n")
    js = tmp_path / "emulated_network.json"
    js.write_text(json.dumps({"links": [{"rate_mbit": 250}]}))
    argv = ["report", str(out), "--raw-dir", str(raw_dir), "--json", str(js), "--json-key", "study_link250mbit",
            "--results-md", str(results), "--baseline", "moe_top2", "--section", "emulated-250",
            "--figure-prefix", "emulated_250_",
            "--figures", str(tmp_path), "--samples", "100"]
    report.main(argv)
    whole = json.loads(js.read_text())
    assert whole["links"] == [{"rate_mbit": 250}]
    pairs = [(c["config"], c["baseline"]) for c in whole["study_link250mbit"]["comparisons"]
             if c["kind"] == "equal_updates"]
    # the order: the known configs, then the runs in the order they were timed
    assert pairs == [("moe_top2", "fairseq_dense"), ("gate_local_p0.3", "fairseq_dense"),
                     ("gate_drop_p0.3", "fairseq_dense"), ("gate_local_p0.3", "moe_top2"),
                     ("gate_drop_p0.3", "moe_top2")]
    text = results.read_text()
    assert "the Multi30k study" in text and "old" not in text.split(begin)[1]
    assert "| gate_drop_p0.3 − moe_top2 |" in text
    ttl = text.split("Wall-clock to a validation loss")[1]
    # first the highest final loss of the pair, which both reach, then top-2's own final loss (4.8)
    # where it is lower; top-2 makes 0.2 updates/s and reaches 5.0 at update 90 and 4.9 at 95
    assert "| fairseq_dense | moe_top2 | 5.000 | 4.2 (1/1 reach it) | 7.5 (1/1 reach it) |" in ttl
    assert "| fairseq_dense | moe_top2 | 4.800 | not reached | 8.3 (1/1 reach it) |" in ttl
    # gate_local reaches 4.8 at update 95, between 50 (5.7) and 100 (4.7), at 0.25 updates/s: one row
    assert "| gate_local_p0.3 | moe_top2 | 4.800 | 6.3 (1/1 reach it) | 8.3 (1/1 reach it) |" in ttl
    assert ttl.count("| gate_local_p0.3 | moe_top2 |") == 1
    assert "| gate_drop_p0.3 | moe_top2 | 4.900 | 6.7 (1/1 reach it) | 7.9 (1/1 reach it) |" in ttl
    assert "| gate_drop_p0.3 | moe_top2 | 4.800 | not reached | 8.3 (1/1 reach it) |" in ttl
    assert "| moe_top2 | moe_top2 |" not in ttl
    for png in ("emulated_250_convergence_updates.png", "emulated_250_convergence_time.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from moe_fairseq.moe.errors import MoEUsageError

    with pytest.raises(MoEUsageError, match="--baseline moe_top1: no finished run of it"):
        report.main(argv + ["--baseline", "moe_top1"])  # the last one wins
    js.write_text("[1, 2]")
    with pytest.raises(MoEUsageError, match="--json-key adds to a JSON object"):
        report.main(argv)


def test_rebase_reads_the_runs_at_another_configs_budget(tmp_path, refs, raw_dir):
    """`rebase` makes another config the anchor of the same measurement: ratios are the medians of
    the per-round ratios to it; `equal-time` with it reads each slower run at the update it reaches
    in that config's time and keeps a faster one at its final update."""
    speed = {"anchor": "fairseq_dense", "rounds": 3, "threads": 1,
             "configs": {"fairseq_dense": {"ups": 0.4, "wps": 1500, "ratio": 1.0},
                         "moe_top2": {"ups": 0.2, "wps": 700, "ratio": 0.5},
                         "gate_drop_p0.3": {"ups": 0.24, "wps": 850, "ratio": 0.6},
                         "smoe": {"ups": 0.3, "wps": 900, "ratio": 0.75}},  # timed per k: no raw of its own
             "raw": {"fairseq_dense": [{"ups": 0.4}, {"ups": 0.4}, {"ups": 0.4}],
                     "moe_top2": [{"ups": 0.2}, {"ups": 0.21}, {"ups": 0.19}],
                     "gate_drop_p0.3": [{"ups": 0.25}, {"ups": 0.24}, {"ups": 0.2}]}}
    src = tmp_path / "throughput.json"
    src.write_text(json.dumps(speed))
    out = tmp_path / "budget"
    make_run(out, "moe_top2", 1, refs, 0.2, [5.8, 4.8])
    make_run(out, "gate_drop_p0.3", 1, refs, 0.25, [5.9, 4.9])
    (out / "moe_top2" / "seed1" / "checkpoint_1_50.pt").write_text("weights")
    make_eval(out / "moe_top2" / "seed1" / "eval_u50", refs, 0.3, "u50")  # read already: no evaluation
    report.main(["rebase", str(src), "--anchor", "gate_drop_p0.3", "--out", str(out / "throughput.json")])
    got = json.loads((out / "throughput.json").read_text())
    assert got["anchor"] == "gate_drop_p0.3" and got["rebased_from"] == "fairseq_dense"
    ratios = {c: v["ratio"] for c, v in got["configs"].items()}
    # per round: top-2 0.2/0.25, 0.21/0.24, 0.19/0.2 -> median 0.875 (the ratio of medians is 0.833)
    assert ratios["moe_top2"] == pytest.approx(0.875) and ratios["gate_drop_p0.3"] == 1.0
    assert got["configs"]["moe_top2"]["ratio_of_medians"] == pytest.approx(0.2 / 0.24)
    assert ratios["fairseq_dense"] == pytest.approx(0.4 / 0.24)  # 0.4/0.25, 0.4/0.24, 0.4/0.2
    assert ratios["smoe"] == pytest.approx(0.3 / 0.24)
    assert got["configs"]["moe_top2"]["ups"] == 0.2 and got["raw"] == speed["raw"]
    report.main(["equal-time", str(out), "--data", "unused"])
    rec = json.loads((out / "moe_top2" / "seed1" / "record.json").read_text())
    assert rec["equal_time"]["updates"] == 50 and rec["equal_time"]["ratio"] == pytest.approx(0.875)
    rec = json.loads((out / "gate_drop_p0.3" / "seed1" / "record.json").read_text())
    assert rec["equal_time"]["updates"] == 100 and not rec["equal_time"]["capped"]
    from moe_fairseq.moe.errors import MoEUsageError

    js = tmp_path / "budget.json"
    report.main(["report", str(out), "--anchor", "gate_drop_p0.3", "--baseline", "moe_top2", "--raw-dir",
                 str(raw_dir), "--json", str(js), "--no-figures", "--samples", "100"])
    [cmp] = [c for c in json.loads(js.read_text())["comparisons"] if c["kind"] == "equal_time"]
    assert (cmp["config"], cmp["baseline"]) == ("moe_top2", "gate_drop_p0.3")
    assert not list(out.glob("*.png"))
    with pytest.raises(MoEUsageError, match="--anchor moe_top1: not timed"):
        report.main(["rebase", str(src), "--anchor", "moe_top1", "--out", str(tmp_path / "x.json")])


def test_time_to_loss_reads_the_runs_continued_past_their_budget(tmp_path, refs, raw_dir, monkeypatch):
    """report --continued: a run that does not reach the baseline's final loss within its budget
    is timed on its continuation (validation only) and marked past the budget; a continuation
    that does not reach it either says how far it went; a continuation trained with other flags
    than its run is refused; continuations of runs not in the study are left out, but a directory
    that continues none of its runs is refused."""
    out, cont = tmp_path / "link250mbit", tmp_path / "continued_to200"
    make_run(out, "fairseq_dense", 1, refs, 0.35, [6.0, 5.0])
    make_run(out, "moe_top2", 1, refs, 0.2, [5.8, 4.8])
    make_run(out, "gate_drop_p0.3", 1, refs, 0.25, [5.9, 4.9])
    (out / "throughput.json").write_text(json.dumps({
        "anchor": "fairseq_dense", "rounds": 1, "threads": 1,
        "configs": {"fairseq_dense": {"ups": 0.4, "wps": 1700, "ratio": 1.0},
                    "moe_top2": {"ups": 0.2, "wps": 800, "ratio": 0.5},
                    "gate_drop_p0.3": {"ups": 0.25, "wps": 900, "ratio": 0.625}}}))

    def continued(config, losses, flags):
        save = cont / config / "seed1"
        save.mkdir(parents=True)
        # the continuation's log repeats nothing of the run's: it starts past update 100
        (save / "train.log").write_text(train_log([150, 200], losses))
        (save / "flags.txt").write_text(flags)
        report.main(["record", str(save), "--config", config, "--seed", "1", "--no-eval"])

    continued("gate_drop_p0.3", [4.85, 4.7], "--arch x --seed 1 --restore-file /runs/checkpoint_last.pt")
    continued("fairseq_dense", [4.95, 4.9], "--arch y --seed 1")
    for config, flags in (("gate_drop_p0.3", "--arch x --seed 1"), ("fairseq_dense", "--arch y --seed 1")):
        path = out / config / "seed1" / "record.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "flags": flags.split()}))
    argv = ["report", str(out), "--raw-dir", str(raw_dir), "--json", str(tmp_path / "s.json"),
            "--baseline", "moe_top2", "--no-figures", "--samples", "50", "--continued", str(cont)]
    drawn = {}
    monkeypatch.setattr(report.plots, "plot_seed_bands",
                        lambda curves, out, *a, **k: drawn.setdefault(Path(out).name, curves) and Path(out))
    report.main([a for a in argv if a != "--no-figures"] + ["--figures", str(tmp_path)])
    # the curves are drawn on through the continuations, against updates and against minutes
    assert drawn["study_convergence_updates.png"]["gate_drop_p0.3"] == [[(50, 5.9), (100, 4.9), (150, 4.85), (200, 4.7)]]
    assert drawn["study_convergence_updates.png"]["moe_top2"] == [[(50, 5.8), (100, 4.8)]]
    assert drawn["study_convergence_time.png"]["fairseq_dense"][0][-1] == (pytest.approx(200 / 0.4 / 60), 4.9)
    assert "Past update 100, the budget, the curves are the runs continued" in (out / "report.md").read_text()
    report.main(argv)
    ttl = (out / "report.md").read_text().split("Wall-clock to a validation loss")[1]
    assert "continued to 200 updates on validation loss alone" in ttl
    # Gate-Drop reaches 4.8 at update 150 + 50 * 0.05 / 0.15 = 166.7, at 0.25 updates/s: 11.1 min
    assert "| gate_drop_p0.3 | moe_top2 | 4.800 | 11.1 (1/1 reach it, 1 past the budget) | 8.3 (1/1 reach it) |" in ttl
    assert "| fairseq_dense | moe_top2 | 4.800 | not reached in 200 updates | 8.3 (1/1 reach it) |" in ttl
    # within the budget nothing changes: the highest final loss of the pair is reached at 4.0 min
    assert "| gate_drop_p0.3 | moe_top2 | 4.900 | 6.7 (1/1 reach it) | 7.9 (1/1 reach it) |" in ttl
    entries = {(e["config"], e["target_loss"]): e for e in json.loads((tmp_path / "s.json").read_text())["time_to_loss"]}
    gate = entries[("gate_drop_p0.3", 4.8)]["seeds"]
    assert gate["gate_drop_p0.3"] == [{"seed": 1, "minutes": pytest.approx(500 / 0.25 / 60 / 3), "past_budget": True,
                                       "curve_to": 200, "continued": True}]
    assert gate["moe_top2"] == [{"seed": 1, "minutes": pytest.approx(100 / 0.2 / 60), "past_budget": False,
                                 "curve_to": 100, "continued": False}]
    assert entries[("fairseq_dense", 4.8)]["seeds"]["fairseq_dense"][0]["minutes"] is None
    report.main(argv[:-2])  # without the continuations: not reached, as before
    assert "| gate_drop_p0.3 | moe_top2 | 4.800 | not reached | 8.3 (1/1 reach it) |" in (out / "report.md").read_text()

    from moe_fairseq.moe.errors import MoEUsageError

    (cont / "fairseq_dense" / "seed1" / "flags.txt").write_text("--arch y --seed 2")
    report.main(["record", str(cont / "fairseq_dense" / "seed1"), "--config", "fairseq_dense", "--seed", "1", "--no-eval"])
    with pytest.raises(MoEUsageError, match="trained with other flags than the run it continues"):
        report.main(argv)
    import shutil

    shutil.rmtree(cont / "fairseq_dense")
    continued("moe_top1", [4.85, 4.7], "--arch z")  # a run of another study (budget): left out
    report.main(argv)
    assert "| gate_drop_p0.3 | moe_top2 | 4.800 | 11.1 (1/1 reach it, 1 past the budget) |" in (out / "report.md").read_text()
    shutil.rmtree(cont / "gate_drop_p0.3")
    with pytest.raises(MoEUsageError, match="none of its 1 CONFIG/seedS/record.json continues a run of"):
        report.main(argv)
