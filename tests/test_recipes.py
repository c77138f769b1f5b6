"""Experiment recipes: configs/*.args, the launchers, the plot scripts and slimmable_eval.

The static checks take milliseconds.  The `slow` tests run fairseq for real on tiny data
(MOE_FAST_TESTS=1 skips them): every multi30k config trains one update (all nine in one
process, about 30 s on a busy 2-core machine), a 2-update SMoE-Dropout model feeds the
expert-usage plot and slimmable_eval (three fairseq-generate runs, one per k).
"""
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import REPO, USER_DIR, make_tiny_corpus, run, train_cmd
from moe_fairseq.experiments.launch import config_args

CONFIGS = REPO / "configs"
SCRIPTS = REPO / "scripts"
SETUPS = ("multi30k", "wmt10")
EXPERIMENTS = ("dense", "moe_top1", "moe_top2", "moe_top2_gate_drop", "moe_top2_gate_expert_drop",
               "smoe_dropout", "noisy_topk")
ANCHOR = "fairseq_dense"  # multi30k only: plain fairseq, no plugin (the study's external baseline)
# multi30k only: local_topk needs k <= experts per rank, which wmt10's 8 experts over 32 GPUs do not give
MULTI30K_ONLY = ("moe_top2_gate_local",)
# the flags in which the anchor may differ from the plugin's configs: fairseq's own task, arch and criterion
ANCHOR_OWN_FLAGS = {"--task", "--arch", "--criterion"}
WMT10_LANGS = ("fr", "cs", "de", "fi", "lv", "et", "ro", "hi", "tr", "gu")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

slow = pytest.mark.skipif(os.environ.get("MOE_FAST_TESTS") == "1",
                          reason="slow-ish (runs fairseq); unset MOE_FAST_TESTS to run")


def experiments(setup):
    """The plugin's experiments of a setup (the anchor aside)."""
    return EXPERIMENTS + (MULTI30K_ONLY if setup == "multi30k" else ())


def config_path(setup, name):
    return CONFIGS / setup / f"{name}.args"


def config_flags(path):
    """{flag: value or True} of an args file (one flag per line)."""
    flags = {}
    for line in Path(path).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        toks = line.split()
        flags[toks[0]] = toks[1] if len(toks) > 1 else True
    return flags


def experiment(name):
    """The library module that scripts/NAME.py runs."""
    return importlib.import_module(f"moe_fairseq.experiments.{name}")


def assert_png(path):
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"


# ---------------------------------------------------------------- configs: static checks

@pytest.mark.parametrize("setup", SETUPS)
def test_every_experiment_has_a_config(setup):
    expected = experiments(setup) + ((ANCHOR,) if setup == "multi30k" else ())
    assert sorted(p.stem for p in (CONFIGS / setup).glob("*.args")) == sorted(expected)
    assert (CONFIGS / "README.md").is_file()


def test_config_files_are_one_flag_per_line_and_shell_safe():
    for path in sorted(CONFIGS.glob("*/*.args")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("#") or not line.strip():
                continue
            toks = line.split()
            where = f"{path.relative_to(REPO)}:{lineno}: {line!r}"
            assert toks[0].startswith("--") and len(toks) <= 2, f"one flag (and its value) per line: {where}"
            assert "#" not in line, f"comments only on lines of their own: {where}"
            assert not any(c in line for c in "*?[]'\\"), f"glob/quote characters: {where}"


def test_the_shell_splits_configs_as_the_tests_do():
    paths = sorted(CONFIGS.glob("*/*.args"))
    script = 'set -f; for f in "$@"; do printf "%s\\n" $(grep -v "^#" "$f"); printf "=== end\\n"; done'
    out = subprocess.run(["bash", "-c", script, "_", *map(str, paths)], capture_output=True, text=True,
                         check=True).stdout
    chunks = out.split("=== end\n")[:-1]
    assert len(chunks) == len(paths)
    for path, chunk in zip(paths, chunks):
        assert chunk.split("\n")[:-1] == config_args(path), path


@pytest.mark.parametrize("setup", SETUPS)
def test_experiments_of_a_setup_differ_only_in_moe_and_ffn_flags(setup):
    """A fair comparison: same data, optimisation, schedule, logging in every experiment."""
    def shared(name):
        return {k: v for k, v in config_flags(config_path(setup, name)).items()
                if not k.startswith("--moe-") and not k.endswith("-ffn-embed-dim")}

    reference = shared("moe_top2")
    for name in experiments(setup):
        assert shared(name) == reference, f"{setup}/{name} differs from moe_top2 outside the MoE/FFN flags"
    if setup == "multi30k":  # the anchor: the same data, dims and optimisation, fairseq's own code
        anchor = config_flags(config_path(setup, ANCHOR))
        assert anchor["--task"] == "translation_multi_simple_epoch" and anchor["--arch"] == "transformer"
        assert anchor["--criterion"] == "label_smoothed_cross_entropy"
        assert not any(k.startswith("--moe-") for k in anchor)
        dense = config_flags(config_path(setup, "dense"))
        for flags in (anchor, dense):
            for k in ANCHOR_OWN_FLAGS:
                flags.pop(k)
        dense = {k: v for k, v in dense.items() if not k.startswith("--moe-")}
        assert anchor == dense, "the plugin's dense twin must be the anchor's model and recipe"


def active_ffn(flags, side, k):
    """Hidden FFN units a token activates over one side's layers (k experts in MoE layers)."""
    layers, ffn = int(flags[f"--{side}-layers"]), int(flags[f"--{side}-ffn-embed-dim"])
    freq = int(flags.get("--moe-freq", 0)) if flags.get("--moe-expert-count", "0") != "0" else 0
    expert = int(flags.get("--moe-expert-ffn-dim", ffn))
    return sum(k * expert if freq and (i + 1) % freq == 0 else ffn for i in range(layers))


@pytest.mark.parametrize("setup", SETUPS)
def test_dense_config_matches_top2_active_ffn_compute(setup):
    dense, top2 = config_flags(config_path(setup, "dense")), config_flags(config_path(setup, "moe_top2"))
    assert dense["--moe-freq"] == "0" and dense["--moe-expert-count"] == "0"
    for side in ("encoder", "decoder"):
        active, dense_total = active_ffn(top2, side, 2), active_ffn(dense, side, 1)
        assert abs(dense_total - active) / active < 0.005, (setup, side, dense_total, active)
    if setup == "multi30k":  # top-1 and noisy top-2 have the same active compute too
        for name, k in (("moe_top1", 1), ("noisy_topk", 2)):
            flags = config_flags(config_path(setup, name))
            assert active_ffn(flags, "encoder", k) == active_ffn(dense, "encoder", 1), name


@pytest.mark.parametrize("setup", SETUPS)
def test_moe_configs_use_the_methods_settings(setup):
    flags = {name: config_flags(config_path(setup, name)) for name in experiments(setup)}
    for name in experiments(setup)[1:]:
        assert flags[name]["--moe-expert-count"] == "8"
    assert flags["moe_top1"]["--moe-router"] == "top1"
    assert flags["moe_top2"]["--moe-router"] == "top2"
    assert (flags["moe_top2_gate_drop"]["--moe-gating-dropout"],
            flags["moe_top2_gate_drop"]["--moe-gating-dropout-mode"]) == ("0.3", "gate_drop")
    assert (flags["moe_top2_gate_expert_drop"]["--moe-gating-dropout"],
            flags["moe_top2_gate_expert_drop"]["--moe-gating-dropout-mode"]) == ("0.2", "gate_expert_drop")
    smoe = flags["smoe_dropout"]
    assert smoe["--moe-router"] == "random" and smoe["--moe-split-ffn"] is True
    assert (smoe["--moe-top-k-min"], smoe["--moe-top-k-max"], smoe["--moe-top-k-schedule"]) == ("1", "8", "linear")
    assert smoe["--moe-top-k-schedule-steps"] == smoe["--max-update"], "k must reach E at the end of the run"
    if setup == "multi30k":  # the same expert count, expert placement and load balancing in the family
        assert (flags["moe_top2_gate_local"]["--moe-gating-dropout"],
                flags["moe_top2_gate_local"]["--moe-gating-dropout-mode"]) == ("0.3", "local_topk")
        family = ("moe_top2", "moe_top2_gate_drop", "moe_top2_gate_expert_drop", "moe_top2_gate_local")
        assert {k: v for k, v in flags["moe_top2_gate_local"].items() if not k.startswith("--moe-gating-dropout")} \
            == {k: v for k, v in flags["moe_top2_gate_drop"].items() if not k.startswith("--moe-gating-dropout")}
        for name in family:
            assert (flags[name]["--moe-freq"], flags[name]["--moe-expert-ffn-dim"]) == ("1", "512"), name
            assert flags[name]["--moe-dropless"] is True and flags[name]["--moe-gate-loss-wt"] == "0.01", name
    assert flags["noisy_topk"]["--moe-router"] == "noisy_topk"


def parse_with_fairseq(path, data="data-bin/x"):
    from fairseq import options

    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, input_args=[data, "--user-dir", USER_DIR, *config_args(path)])


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_wmt10_config_parses_with_fairseqs_parser(name):
    from moe_fairseq.models.transformer_moe import moe_plan

    args = parse_with_fairseq(config_path("wmt10", name))
    assert args.task == "translation_multi_moe" and args.arch == "transformer_moe_base"
    pairs = args.lang_pairs.split(",") if isinstance(args.lang_pairs, str) else list(args.lang_pairs)
    assert sorted(pairs) == sorted([f"en-{x}" for x in WMT10_LANGS] + [f"{x}-en" for x in WMT10_LANGS])
    assert args.encoder_langtok == "src" and args.decoder_langtok
    assert args.sampling_method == "temperature" and args.sampling_temperature == 5
    assert args.fp16 and args.fp16_no_flatten_grads and args.ddp_backend == "legacy_ddp"
    assert args.encoder_embed_dim == 512 and args.encoder_layers == 6
    moe_plan(args)  # the MoE flags are consistent (k <= E, split FFN divisible, ...)
    assert args.moe_expert_count == (0 if name == "dense" else 8)


# ---------------------------------------------------------------- launchers (dry runs)

def dry_run(script, *args, **env):
    proc = subprocess.run(["bash", str(SCRIPTS / script), *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, DRY_RUN="1", **env))
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)  # the scripts print the command with printf %q


def test_train_sh_puts_config_then_extra_args():
    cmd = dry_run("train.sh", config_path("multi30k", "moe_top2"), "DATA", "SAVE", "--cpu", "--max-update", "7")
    assert cmd[1] == "DATA" and cmd[cmd.index("--user-dir") + 1] == USER_DIR
    body = cmd[cmd.index("--user-dir") + 2:]
    n = len(config_args(config_path("multi30k", "moe_top2")))
    assert body[:n] == config_args(config_path("multi30k", "moe_top2"))
    assert body[n:] == ["--save-dir", "SAVE", "--cpu", "--max-update", "7"]


def test_train_torchrun_sh_world_size_and_cpu_mode():
    cmd = dry_run("train_torchrun.sh", config_path("wmt10", "moe_top2"), "DATA", "SAVE", NNODES="2", NPROC="4",
                  NODE_RANK="1", MASTER_ADDR="node0", MASTER_PORT="1234")
    assert cmd[0].endswith("torchrun")
    for flag, value in (("--nproc_per_node", "4"), ("--nnodes", "2"), ("--node_rank", "1"),
                        ("--master_addr", "node0"), ("--master_port", "1234"), ("--distributed-world-size", "8")):
        assert cmd[cmd.index(flag) + 1] == value, flag
    assert "--cpu" not in cmd
    cmd = dry_run("train_torchrun.sh", config_path("multi30k", "moe_top2"), "DATA", "SAVE", CPU="1", NPROC="2")
    assert cmd[cmd.index("--distributed-world-size") + 1] == "2"
    assert "--cpu" in cmd and cmd[cmd.index("--distributed-backend") + 1] == "gloo"


def test_multi_process_launchers_set_a_collective_timeout_for_moe_runs():
    """A dead or hung rank must end the job: the launchers pass --collective-timeout (600 s by
    default, COLLECTIVE_TIMEOUT overrides, a later extra arg wins) with the MoE task only,
    since fairseq's own tasks (the plain-fairseq anchor) do not know the flag."""
    for script, env in (("train_torchrun.sh", {"CPU": "1"}), ("train_slurm.sh", {})):
        cmd = dry_run(script, config_path("multi30k", "moe_top2"), "DATA", "SAVE", **env)
        assert cmd[cmd.index("--collective-timeout") + 1] == "600"
        cmd = dry_run(script, config_path("multi30k", "moe_top2"), "DATA", "SAVE", "--collective-timeout", "30",
                      COLLECTIVE_TIMEOUT="90", **env)
        assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--collective-timeout"] == ["90", "30"]
        assert "--collective-timeout" not in dry_run(script, config_path("multi30k", "fairseq_dense"), "DATA", "SAVE",
                                                     **env)


def test_train_slurm_sh_uses_fairseqs_slurm_detection():
    cmd = dry_run("train_slurm.sh", config_path("wmt10", "moe_top2"), "DATA", "SAVE", SLURM_NNODES="2",
                  SLURM_NTASKS="16", SLURM_JOB_ID="4242")
    assert cmd[0] == "srun"
    assert cmd[cmd.index("--distributed-world-size") + 1] == "16"
    assert cmd[cmd.index("--distributed-port") + 1] == str(10000 + 4242 % 20000)
    assert {"MASTER_ADDR", "WORLD_SIZE", "RANK"} <= {cmd[i + 1] for i, a in enumerate(cmd) if a == "-u"}
    assert cmd[cmd.index("--user-dir") + 1] == USER_DIR


# ---------------------------------------------------------------- configs train one update

TRAIN_DRIVER = r"""
import json, os, sys
os.dup2(1, 2)  # one stream: the markers below and fairseq's logging stay in order
import torch
torch.set_num_threads(1)
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.distributed import utils as distributed_utils
from fairseq_cli.train import main
for label, argv in json.loads(sys.argv[1]):
    print("=== begin " + label, flush=True)
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=argv)
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), main)
    print("=== trained " + label, flush=True)
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("recipes_corpus"))  # en -> de, fr


@slow
def test_multi30k_configs_train_one_update(corpus, tmp_path):
    """Each multi30k config, exactly as the CLI reads it, plus overrides for the tiny corpus
    (the last value wins): one update, then validation.  The anchor runs without --user-dir
    (plain fairseq).  One process runs fairseq-train's main for all nine, so fairseq is
    imported once (the plugin registers itself when the first plugin config loads it)."""
    overrides = ["--lang-pairs", "en-de,en-fr", "--max-update", "1", "--cpu", "--num-workers", "0",
                 "--no-save", "--max-tokens", "1000", "--log-format", "json", "--log-interval", "1"]
    names = (ANCHOR,) + experiments("multi30k")  # the anchor first: fairseq without the plugin loaded
    jobs = [[name, [str(corpus), *([] if name == ANCHOR else ["--user-dir", USER_DIR]),
                    *config_args(config_path("multi30k", name)), *overrides,
                    "--save-dir", str(tmp_path / name)]] for name in names]
    proc = run([sys.executable, "-c", TRAIN_DRIVER, json.dumps(jobs)], timeout=600)
    log = proc.stdout
    for name in names:
        assert f"=== trained {name}" in log, f"{name} did not finish:\n{log[-3000:]}"
        part = log.split(f"=== begin {name}")[1].split(f"=== trained {name}")[0]
        assert '"train_num_updates": "1"' in part, f"{name}: not exactly one update\n{part[-2000:]}"
        assert '"valid_loss"' in part, f"{name}: no validation"
        experts = int(part.split("num. expert model params: ")[1].split()[0].replace(",", ""))
        assert (experts == 0) == (name in ("dense", ANCHOR)), (name, experts)
        if name == "noisy_topk":
            assert "moe_importance_loss" in part


# ---------------------------------------------------------------- plot_convergence

JSON_LOG = """\
2024-05-01 10:00:00 | INFO | fairseq_cli.train | begin training epoch 1
2024-05-01 10:01:40 | INFO | train_inner | {"epoch": 1, "update": 0.5, "loss": "9.1", "nll_loss": "8.9", "num_updates": "100", "wall": "100"}
2024-05-01 10:01:40 | INFO | fairseq_cli.train | begin validation on "valid" subset
2024-05-01 10:01:50 | INFO | valid | {"epoch": 1, "valid_loss": "8.5", "valid_nll_loss": "8.2", "valid_ppl": "294.07", "valid_num_updates": "100"}
2024-05-01 10:03:30 | INFO | train_inner | {"epoch": 1, "update": 1.0, "loss": "8.1", "nll_loss": "7.9", "num_updates": "200", "wall": "210"}
2024-05-01 10:03:45 | INFO | valid | {"epoch": 1, "valid_loss": "7.5", "valid_nll_loss": "7.2", "valid_num_updates": "200", "valid_best_loss": "7.5"}
2024-05-01 10:03:46 | INFO | train | {"epoch": 1, "train_loss": "8.6", "train_nll_loss": "8.4", "train_num_updates": "200", "train_wall": "226"}
"""
SIMPLE_LOG = """\
INFO:fairseq_cli.train:begin training epoch 1
INFO:train_inner:epoch 001:    100 / 200 loss=9.0, nll_loss=8.8, ppl=445.7, num_updates=100, lr=0.0001, wall=50
INFO:valid:epoch 001 | valid on 'valid' subset | loss 8.0 | nll_loss 7.8 | ppl 222.9 | num_updates 100
INFO:train:epoch 001 | loss 8.5 | nll_loss 8.3 | num_updates 200 | train_wall 90 | wall 100
INFO:valid:epoch 001 | valid on 'valid' subset | loss 7.0 | nll_loss 6.8 | ppl 111.4 | num_updates 200 | best_loss 7.0
"""


def test_plot_convergence_from_json_and_simple_logs(tmp_path):
    (tmp_path / "top2").mkdir()
    (tmp_path / "top2" / "train.log").write_text(JSON_LOG)
    (tmp_path / "dense.log").write_text(SIMPLE_LOG)
    out = tmp_path / "plots" / "conv.png"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "plot_convergence.py"), str(tmp_path / "top2" / "train.log"),
                           str(tmp_path / "dense.log"), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert_png(out)
    points = json.loads(out.with_suffix(".json").read_text())
    assert sorted(points) == ["dense", "top2"]
    # json log: wall of the last train line + the time between the two timestamps
    assert [(p["num_updates"], p["wall"], p["loss"], p["nll_loss"]) for p in points["top2"]] == \
        [(100, 110, 8.5, 8.2), (200, 225, 7.5, 7.2)]
    # simple log without timestamps: the last train line's wall
    assert [(p["num_updates"], p["wall"], p["loss"], p["nll_loss"]) for p in points["dense"]] == \
        [(100, 50, 8.0, 7.8), (200, 100, 7.0, 6.8)]
    # updates on the x axis, labels given
    out2 = experiment("plot_convergence").main([str(tmp_path / "dense.log"), "--labels", "d", "--x", "updates",
                                                 "--out", str(tmp_path / "conv_updates.png")])
    assert_png(out2)


# ---------------------------------------------------------------- a tiny SMoE-Dropout run

@pytest.fixture(scope="module")
def smoe_run(corpus, tmp_path_factory):
    """Random router, E=4 split experts, k 1 -> 4 over 2 updates; a checkpoint after each update."""
    save = tmp_path_factory.mktemp("smoe")
    run(train_cmd(corpus, save, "--moe-router", "random", "--moe-expert-count", "4", "--moe-split-ffn",
                  "--moe-top-k-max", "4", "--moe-top-k-schedule-steps", "2", "--save-interval-updates", "1",
                  max_update=2))
    assert (save / "checkpoint_1_1.pt").exists() and (save / "checkpoint_1_2.pt").exists()
    return save


@slow
def test_plot_expert_usage_from_checkpoints(corpus, smoe_run, tmp_path):
    usage = experiment("plot_expert_usage")
    out = tmp_path / "usage"
    usage.main([str(smoe_run), "--data", str(corpus), "--out-dir", str(out), "--sentences", "16", "--cpu"])
    assert_png(out / "expert_usage_over_training.png")
    assert_png(out / "expert_usage_per_language.png")
    report = json.loads((out / "expert_usage.json").read_text())
    assert report["directions"] == ["en-de", "en-fr"]
    assert report["layers"] == ["encoder layer 1", "decoder layer 1"]
    runs = list(report["checkpoints"].values())
    assert [r["update"] for r in runs] == [1, 2]
    for r in runs:
        for layer in report["layers"]:
            for counts in r["counts"][layer].values():
                # evaluation k = k_max = E = 4: every token goes to every expert
                assert len(counts) == 4 and counts[0] > 0 and len(set(counts)) == 1

    # --moe-eval-top-k 1: each token goes to one expert, so the layer sees a quarter of the slots
    usage.main([str(smoe_run / "checkpoint_1_2.pt"), "--data", str(corpus), "--out-dir", str(tmp_path / "k1"),
                "--sentences", "16", "--cpu", "--moe-eval-top-k", "1"])
    k1 = list(json.loads((tmp_path / "k1" / "expert_usage.json").read_text())["checkpoints"].values())[0]
    for layer in report["layers"]:
        for pair in report["directions"]:
            assert 4 * sum(k1["counts"][layer][pair]) == sum(runs[1]["counts"][layer][pair])


# ---------------------------------------------------------------- slimmable_eval

@slow
def test_slimmable_eval_scores_each_k(corpus, smoe_run, tmp_path):
    """k in {1, 2, 4} for E=4, through moe-evaluate (fairseq-generate --moe-eval-top-k K +
    sacrebleu).  One direction of the two trained: --langs keeps the dictionary as trained.
    The tiny corpus has no sentencepiece, so post-processing joins the tokens: a smoke test."""
    out = tmp_path / "slim"
    result = experiment("slimmable_eval").main([
        str(smoe_run / "checkpoint_last.pt"), "--data", str(corpus), "--raw-dir", str(corpus.parent / "raw"),
        "--out", str(out), "--lang-pairs", "en-de", "--cpu", "--beam", "1",
        "--", "--max-len-a", "1", "--max-len-b", "5"])
    saved = json.loads((out / "slimmable.json").read_text())
    assert saved["experts"] == 4 and saved["ks"] == [1, 2, 4] and result["ks"] == [1, 2, 4]
    assert sorted(saved["bleu"]) == ["1", "2", "4"]
    assert all(isinstance(saved["bleu"][k]["en-de"], float) for k in saved["bleu"])
    assert "nrefs:1" in saved["signature"]
    # k really changed: the hypotheses (or their scores) with 1 and with all 4 experts differ
    def hyps(k):
        return [line for line in (out / f"k{k}" / "generate.test.en-de.txt").read_text().splitlines()
                if line.startswith(("H-", "P-"))]
    assert len(hyps(1)) == 80 and hyps(1) != hyps(4)
    table = (out / "slimmable.md").read_text()
    assert table.startswith("| k | en-de |") and "| 4 |" in table
    assert_png(out / "slimmable_bleu.png")


def test_slimmable_eval_refuses_a_fixed_k_router(tmp_path):
    """A top-2 checkpoint cannot change k: a clear error before any generation."""
    import argparse

    import torch

    ckpt = tmp_path / "top2.pt"
    model = argparse.Namespace(moe_expert_count=8, moe_router="top2", moe_top1_expert=False)
    torch.save({"model": {}, "cfg": {"model": model, "task": argparse.Namespace(lang_pairs=["en-de"])}}, ckpt)
    with pytest.raises(SystemExit, match="fixed k"):
        experiment("slimmable_eval").main([str(ckpt), "--data", "x", "--raw-dir", "x", "--out", str(tmp_path / "o")])


def test_slimmable_eval_default_ks_and_wmt10_reference_links(tmp_path):
    slim = experiment("slimmable_eval")
    assert slim.default_ks(4) == [1, 2, 4] and slim.default_ks(8) == [1, 2, 4, 8] and slim.default_ks(6) == [1, 2, 4, 6]
    from moe_fairseq.tools.evaluate import training_task_args

    # the plugin's task with language tokens on both sides; languages sorted as fairseq infers them
    assert training_task_args(argparse_ns(task="translation_multi_moe", lang_pairs=["en-fr", "en-de"], langs=None,
                                          lang_dict=None, encoder_langtok="src", decoder_langtok=True)) == \
        ["--task", "translation_multi_moe", "--encoder-langtok", "src", "--decoder-langtok", "--langs", "de,en,fr"]
    # a plain fairseq checkpoint (the study's anchor): its own task, the target token on the source side
    assert training_task_args(argparse_ns(task="translation_multi_simple_epoch", lang_pairs="en-de,en-cs",
                                          langs=None, lang_dict=None, encoder_langtok="tgt",
                                          decoder_langtok=False)) == \
        ["--task", "translation_multi_simple_epoch", "--encoder-langtok", "tgt", "--langs", "cs,de,en"]
    raw = tmp_path / "raw"  # the wmt10 recipe's layout: one file pair per language, named xx-en
    raw.mkdir()
    for name in ("test.fr-en.fr", "test.fr-en.en"):
        (raw / name).write_text("x\n")
    from moe_fairseq.tools.evaluate import find_references

    assert find_references(raw, "test", "en", "fr") == raw / "test.fr-en.fr"
    assert find_references(raw, "test", "fr", "en") == raw / "test.fr-en.en"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "test.de").write_text("x\n")
    assert find_references(plain, "test", "en", "de") == plain / "test.de"

def argparse_ns(**kw):
    import argparse

    return argparse.Namespace(**kw)


# ---------------------------------------------------------------- wmt10 on 2 ranks

@slow
def test_wmt10_config_trains_expert_parallel_resumes_and_consolidates(corpus, tmp_path):
    """configs/wmt10/moe_top2.args as the CLI reads it, its precision lines dropped (fp32 on CPU),
    two directions of the tiny corpus and tiny sizes: 2 gloo ranks with expert parallelism
    (8 experts, 4 per rank) and the config's legacy_ddp train to a sharded checkpoint, resume
    from it, and moe-consolidate merges the final one into a file fairseq loads in one process."""
    from cli_helpers import cli, torchrun_cmd

    path = config_path("wmt10", "moe_top2")
    args = [a for a in config_args(path) if a not in ("--fp16", "--fp16-no-flatten-grads")]
    tiny = ["--lang-pairs", "en-de,en-fr", "--cpu", "--num-workers", "0", "--max-tokens", "600", "--update-freq", "1",
            "--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
            "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
            "--decoder-attention-heads", "2", "--warmup-updates", "2", "--save-interval-updates", "2",
            "--validate-interval-updates", "2", "--log-format", "simple", "--log-interval", "1",
            "--save-dir", str(tmp_path / "ckpt")]

    def train(max_update):
        cmd = [cli("fairseq-train"), corpus, "--user-dir", USER_DIR, *args, *tiny, "--max-update", str(max_update)]
        proc = run(torchrun_cmd(cmd), timeout=600)
        return proc.stdout + proc.stderr

    first = train(2)
    assert "'ddp_backend': 'legacy_ddp'" in first and "'distributed_world_size': 2" in first
    assert "num. expert model params" in first
    second = train(4)
    assert re.search(r"Loaded checkpoint \S*checkpoint_last.pt \(epoch 1 @ 2 updates\)", second), second[-3000:]
    assert re.search(r"num_updates=4\b", second), second[-3000:]
    out = tmp_path / "consolidated.pt"
    run([cli("moe-consolidate"), tmp_path / "ckpt" / "checkpoint_last.pt", out])
    state = torch.load(out, weights_only=False)
    w1 = [v for k, v in state["model"].items() if k.endswith("moe.experts.w1")]
    assert w1 and all(v.shape[0] == 8 for v in w1), "every expert in one file"
    assert state["optimizer_history"][-1]["num_updates"] == 4


def test_a_missing_config_is_refused_in_one_line_naming_the_flag(tmp_path):
    from moe_fairseq.moe.errors import MoEUsageError

    with pytest.raises(MoEUsageError, match=r"^--configs: no config \S*absent\.args$"):
        config_args(tmp_path / "absent.args")
