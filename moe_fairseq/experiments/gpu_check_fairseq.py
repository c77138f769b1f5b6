"""Steps 5-8 of scripts/gpu_check.sh: fairseq's own command lines, end to end, on this machine.

  python scripts/gpu_check_fairseq.py --device cuda|cpu --nprocs W --work DIR --rows ROWS.tsv
                                      [--quick] [--steps 5678]

5. fairseq-train through torchrun on W processes, expert parallel (each rank holds E/W of the
   E experts, tokens cross ranks in all-to-alls), with --ddp-backend pytorch_ddp and legacy_ddp,
   in fp32, --memory-efficient-fp16, --amp and --bf16: UPDATES updates (QUICK: 3) each, on a
   data-bin made by data_prep.synthetic_corpus.  Without CUDA, fairseq 0.12 cannot train in half
   precision: a mode that fairseq-train refuses with "needs a CUDA GPU" is a skip there (it is
   tried, so a mode that becomes possible on CPU is run); any other failure is a failure.
6. resume: UPDATES/2 updates, stop, resume to UPDATES from the sharded checkpoint; every
   parameter of the consolidated result must equal the uninterrupted fp32 pytorch_ddp run of
   step 5 bit for bit (dropout off, same seed).  On CUDA a mismatch is followed by a second
   uninterrupted run, to tell nondeterministic kernels (the two differ too) from a resume bug.
7. moe-consolidate of that run's sharded checkpoint, and fairseq-generate from the one file on
   one device: a hypothesis for every test sentence.
8. words/s of the MoE model against its dense twin (same flags, --moe-expert-count 0), from
   fairseq's per-update wpb/wps after the first update.

Each row appended to ROWS is "step<TAB>status<TAB>seconds<TAB>detail<TAB>json data", status
pass, fail or skip; scripts/gpu_check_report.py prints the table and writes the JSON.  Logs of
every run stay in WORK/logs.
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .launch import REPO
from .plots import parse_log  # fairseq log records; imports no fairseq

BIN = Path(sys.executable).parent
PRECISIONS = (("fp32", []), ("memory-efficient-fp16", ["--memory-efficient-fp16"]), ("amp", ["--amp"]),
              ("bf16", ["--bf16"]))
DDP_BACKENDS = ("pytorch_ddp", "legacy_ddp")
CPU_REFUSAL = "needs a CUDA GPU"  # moe_fairseq's one-line refusal of half precision without CUDA
REFERENCE = ("fp32", "pytorch_ddp")  # the uninterrupted run that steps 6-8 build on


def tool(name):
    path = BIN / name
    if not path.exists():
        raise SystemExit(f"gpu_check_fairseq.py: {name} is not installed beside {sys.executable}")
    return str(path)


class Rows:
    """Appends one line per result to the rows file as soon as it is known (a crash keeps them)."""

    def __init__(self, path):
        self.path = path

    def add(self, step, status, seconds, detail, data=None):
        detail = " ".join(str(detail).split())[:300]
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{step}\t{status}\t{seconds:.1f}\t{detail}\t{json.dumps(data or {})}\n")
        print(f"-- {step}: {status.upper()} ({seconds:.0f} s) {detail}", flush=True)


class Run:
    """One finished command: its output (saved in WORK/logs/NAME.log) and exit status."""

    def __init__(self, name, returncode, log_path, seconds):
        self.name, self.returncode, self.log_path, self.seconds = name, returncode, log_path, seconds
        self.text = log_path.read_text(errors="replace")

    @property
    def ok(self):
        return self.returncode == 0

    def last_error(self):
        """The line that says what went wrong: an exception, else an "error:" line (torchrun's
        own report of a failed child says nothing about why)."""
        lines = [line.strip() for line in self.text.splitlines()
                 if line.strip() and "ChildFailedError" not in line and "elastic" not in line]
        for pattern in (r"\w(Error|Exception): ", r"\berror: ", r"refus|failed|timed out"):
            hits = [line for line in lines if re.search(pattern, line)]
            if hits:
                return hits[-1]
        return lines[-1] if lines else "no output"

    def train_records(self):
        return parse_log(self.log_path).get("train_inner", [])


class Check:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.rows = Rows(args.rows)
        self.cuda = args.device == "cuda"
        self.world = args.nprocs
        self.updates = 3 if args.quick else args.updates
        # at least 4 experts, a multiple of the world size: every rank holds the same number
        self.experts = self.world * max(1, math.ceil(4 / self.world))
        self.targets = ["xa"] if args.quick else ["xa", "xb", "xc"]
        self.runs = {}  # (precision, ddp) -> Run of step 5, reused by steps 6-8
        self.data = None
        self.env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                        CUBLAS_WORKSPACE_CONFIG=":4096:8")  # deterministic cuBLAS: step 6 compares bits

    # ---------------------------------------------------------------- running commands

    def run(self, name, cmd, timeout=1800):
        log_path = self.logs / f"{name}.log"
        print(f"   $ {' '.join(map(str, cmd))}", flush=True)
        start = time.time()
        with open(log_path, "w") as log:
            try:
                rc = subprocess.run([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                    timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                log.write(f"\ngpu_check: timed out after {timeout} s\n")
                rc = -1
        run = Run(name, rc, log_path, time.time() - start)
        if not run.ok:
            print(f"   exit {rc}; last lines of {log_path}:", flush=True)
            print("".join(f"   | {line}\n" for line in run.text.splitlines()[-25:]), end="", flush=True)
        return run

    def make_data(self):
        if self.data is None:
            quick = self.args.quick
            sizes = ["--train", "300", "--valid", "20", "--test", "20", "--vocab-size", "400"] if quick else []
            out = self.work / "data"
            langs = out / "bin" / "langs.txt"  # the data-bin's last file: a complete one of a former run
            if langs.exists() and langs.read_text().split() == sorted(["en", *self.targets]):
                self.data = out
                return out
            run = self.run("data", [sys.executable, "-m", "data_prep.synthetic_corpus", "--out", out / "raw",
                                    "--binarize", out / "bin", "--targets", ",".join(self.targets), *sizes])
            if not run.ok:
                raise StepError(f"data_prep.synthetic_corpus failed: {run.last_error()}")
            self.data = out
        return self.data

    def model_args(self):
        pairs = ",".join(f"en-{t}" for t in self.targets)
        args = ["--user-dir", REPO / "moe_fairseq", "--task", "translation_multi_moe", "--lang-pairs", pairs,
                "--encoder-langtok", "src", "--decoder-langtok", "--arch", "transformer_moe_tiny"]
        if not self.args.quick:
            args += ["--encoder-embed-dim", "256", "--encoder-ffn-embed-dim", "1024", "--decoder-embed-dim", "256",
                     "--decoder-ffn-embed-dim", "1024", "--encoder-attention-heads", "4",
                     "--decoder-attention-heads", "4"]
        return args

    def train_cmd(self, save_dir, precision_flags, ddp, max_update, dense=False):
        data = self.make_data()
        moe = ["--moe-expert-count", "0", "--moe-freq", "0"] if dense else \
            ["--moe-expert-count", self.experts, "--moe-router", "top2"]
        cmd = [tool("fairseq-train"), data / "bin", *self.model_args(), *moe,
               "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
               "--optimizer", "adam", "--lr", "0.002", "--max-tokens", "800" if self.args.quick else "2048",
               "--max-update", max_update, "--dropout", "0.0", "--seed", "3", "--ddp-backend", ddp,
               "--save-dir", save_dir, "--no-epoch-checkpoints", "--disable-validation", "--num-workers", "0",
               "--log-format", "json", "--log-interval", "1", "--no-progress-bar", *precision_flags]
        if not self.cuda:
            cmd += ["--cpu", "--distributed-backend", "gloo"]
        return [tool("torchrun"), "--standalone", "--nproc_per_node", self.world, *cmd]

    def train(self, name, flags, ddp, max_update, dense=False, resume=False, log=None):
        """fairseq-train into WORK/NAME, output in WORK/logs/LOG.log: (save dir, Run).  From
        scratch unless `resume`: a reused WORK must not continue an earlier run's checkpoints."""
        save = self.work / name
        if not resume:
            shutil.rmtree(save, ignore_errors=True)
        return save, self.run(log or name, self.train_cmd(save, flags, ddp, max_update, dense))

    def trained(self, run, max_update):
        """None if `run` trained max_update updates as it should, else what is wrong."""
        if not run.ok:
            return f"fairseq-train failed: {run.last_error()}"
        records = run.train_records()
        if "done training" not in run.text or not records or records[-1].get("num_updates") != max_update:
            return f"fairseq-train ended without {max_update} updates (see {run.log_path})"
        if not all(math.isfinite(r.get("loss", math.nan)) for r in records):
            return "non-finite training loss"
        return None

    # ---------------------------------------------------------------- step 5

    def step_train(self, precision, flags, ddp, refused=None):
        step = f"5 train {precision} {ddp}"
        if refused:
            self.rows.add(step, "skip", 0, f"skipped: {refused}")
            return refused
        start = time.time()
        save, run = self.train(f"train_{precision}_{ddp}", flags, ddp, self.updates)
        seconds = time.time() - start
        if not run.ok and not self.cuda and CPU_REFUSAL in run.text:
            line = next(line for line in reversed(run.text.splitlines()) if CPU_REFUSAL in line)
            reason = f"needs CUDA with fairseq 0.12 (fairseq-train: {line.strip().split('error: ', 1)[-1]})"
            self.rows.add(step, "skip", seconds, f"skipped: {reason}")
            return reason
        self.runs[(precision, ddp)] = run
        problem = self.trained(run, self.updates)
        if problem is None and self.world > 1:
            problem = self.expert_parallel_problem(save, run)
        if problem:
            self.rows.add(step, "fail", seconds, problem)
            return None
        last = run.train_records()[-1]
        where = (f"{self.world} ranks ({'nccl' if self.cuda else 'gloo'}), {self.experts // self.world} of "
                 f"{self.experts} experts per rank" if self.world > 1 else
                 "1 process: no NCCL, no expert parallelism (needs 2 or more GPUs)")
        self.rows.add(step, "pass", seconds, f"{self.updates} updates on {where}; loss {last['loss']:.3f}",
                      {"loss": last["loss"], "updates": self.updates, "world": self.world})
        return None

    def expert_parallel_problem(self, save, run):
        a2a = [r.get("moe_a2a_mb", 0.0) for r in run.train_records()]
        if not max(a2a, default=0.0) > 0:
            return "no tokens crossed ranks (moe_a2a_mb = 0): not expert parallel"
        shards = sorted(p.name for p in save.glob("moe_shards/*/rank-*-of-*.pt"))
        expected = sorted(f"rank-{r}-of-{self.world}.pt" for r in range(self.world))
        if shards != expected:
            return f"expert shards {shards}, expected {expected}"
        return None

    def reference(self):
        """The uninterrupted fp32 pytorch_ddp run (step 5's, or run now when step 5 was not asked)."""
        if REFERENCE not in self.runs:
            self.runs[REFERENCE] = self.train("train_fp32_pytorch_ddp", [], "pytorch_ddp", self.updates)[1]
        problem = self.trained(self.runs[REFERENCE], self.updates)
        if problem:
            raise StepError(f"the uninterrupted fp32 pytorch_ddp run failed ({problem})")
        return self.work / "train_fp32_pytorch_ddp"

    # ---------------------------------------------------------------- step 6

    def step_resume(self):
        ref = self.reference()
        half = max(1, self.updates // 2)
        save, first = self.train("resume", [], "pytorch_ddp", half, log="resume_first_half")
        problem = self.trained(first, half)
        if problem:
            raise StepError(f"first {half} updates: {problem}")
        second = self.train("resume", [], "pytorch_ddp", self.updates, resume=True,
                            log="resume_second_half")[1]
        problem = self.trained(second, self.updates)
        if problem:
            raise StepError(f"resumed run: {problem}")
        if not re.search(rf"Loaded checkpoint \S*checkpoint_last\.pt \(epoch \d+ @ {half} updates\)", second.text):
            raise StepError(f"the second run did not resume from the checkpoint at update {half}")
        same, total, detail = compare_checkpoints(ref / "checkpoint_last.pt", save / "checkpoint_last.pt")
        data = {"tensors": total, "identical": same, "first_half": half, "updates": self.updates}
        if same == total:
            return "pass", (f"{half} updates, stop, resume to {self.updates} on {self.world} rank(s): all {total} "
                            f"consolidated tensors bit-identical to the uninterrupted run"), data
        message = f"{total - same} of {total} tensors differ from the uninterrupted run ({detail})"
        if self.cuda:  # nondeterministic kernels, or the resume? A second uninterrupted run tells.
            again, run = self.train("train_fp32_pytorch_ddp_again", [], "pytorch_ddp", self.updates)
            if self.trained(run, self.updates) is None:
                same2, _, detail2 = compare_checkpoints(ref / "checkpoint_last.pt", again / "checkpoint_last.pt")
                message += ("; two uninterrupted runs are bit-identical, so the resume changed the result"
                            if same2 == total else f"; two uninterrupted runs differ too ({detail2}): "
                                                   "nondeterministic CUDA kernels")
        return "fail", message, data

    # ---------------------------------------------------------------- step 7

    def step_consolidate_generate(self):
        ref = self.reference()
        model = self.work / "consolidated.pt"
        run = self.run("consolidate", [tool("moe-consolidate"), ref / "checkpoint_last.pt", model])
        if not run.ok:
            raise StepError(f"moe-consolidate failed: {run.last_error()}")
        target = self.targets[0]
        data = self.make_data()
        cmd = [tool("fairseq-generate"), data / "bin", *self.model_args(), "--source-lang", "en",
               "--target-lang", target, "--path", model, "--gen-subset", "test", "--beam", "2",
               "--batch-size", "16", "--max-len-b", "20",
               # fairseq's multilingual batch sampler drops a last batch whose size is not a
               # multiple of this (8 by default): 4 of 20 sentences would go untranslated
               "--required-batch-size-multiple", "1"]
        if not self.cuda:
            cmd.append("--cpu")
        env_device = "cuda:0" if self.cuda else "cpu"
        gen = self.run("generate", cmd)
        if not gen.ok:
            raise StepError(f"fairseq-generate failed: {gen.last_error()}")
        n_test = len((data / "raw" / "test.en").read_text().splitlines())
        ids = {int(m) for m in re.findall(r"^H-(\d+)\t", gen.text, flags=re.M)}
        if ids != set(range(n_test)):
            raise StepError(f"fairseq-generate wrote hypotheses for {len(ids)} of {n_test} test sentences")
        wrote = re.search(r"\((\d+) expert tensors", run.text)
        return "pass", (f"moe-consolidate: one file ({wrote.group(1) if wrote else '?'} expert tensors); "
                        f"fairseq-generate en-{target} on {env_device}: {n_test}/{n_test} test sentences"), \
            {"sentences": n_test}

    # ---------------------------------------------------------------- step 8

    def step_words_per_second(self):
        self.reference()
        moe = words_per_second(self.runs[REFERENCE].train_records())
        dense_run = self.train("dense_fp32_pytorch_ddp", [], "pytorch_ddp", self.updates, dense=True)[1]
        problem = self.trained(dense_run, self.updates)
        if problem:
            raise StepError(f"dense twin: {problem}")
        dense = words_per_second(dense_run.train_records())
        if moe is None or dense is None:
            raise StepError("too few logged updates to time (need 2 or more)")
        print(f"\n   words/s, fp32, {self.world} process(es), {self.updates - 1} timed updates each:\n"
              f"   | model | words/s |\n   |:--|--:|\n"
              f"   | MoE ({self.experts} experts, top2) | {moe:.0f} |\n   | dense twin | {dense:.0f} |\n"
              f"   | MoE / dense | {moe / dense:.2f} |\n", flush=True)
        return "pass", f"MoE {moe:.0f} words/s, dense twin {dense:.0f} words/s: MoE/dense {moe / dense:.2f}", \
            {"moe_wps": moe, "dense_wps": dense, "ratio": moe / dense}

    # ---------------------------------------------------------------- driver

    def guarded(self, step, fn):
        start = time.time()
        try:
            status, detail, data = fn()
        except StepError as e:
            status, detail, data = "fail", str(e), None
        except Exception as e:  # a bug of the check itself must show as a failure, not end the table
            status, detail, data = "fail", f"{type(e).__name__}: {e}", None
        self.rows.add(step, status, time.time() - start, detail, data)

    def main(self):
        steps = self.args.steps
        if "5" in steps:
            device = f"{self.world} GPU(s), nccl" if self.cuda else f"{self.world} CPU processes, gloo"
            print(f"== 5. fairseq-train through torchrun ({device}; {self.updates} updates each)", flush=True)
            for precision, flags in PRECISIONS:
                refused = None
                for ddp in DDP_BACKENDS:
                    try:
                        refused = self.step_train(precision, flags, ddp, refused)
                    except StepError as e:
                        self.rows.add(f"5 train {precision} {ddp}", "fail", 0, str(e))
        for number, title, fn in (("6", "6 resume bit-exact", self.step_resume),
                                  ("7", "7 consolidate + generate", self.step_consolidate_generate),
                                  ("8", "8 words/s MoE vs dense", self.step_words_per_second)):
            if number in steps:
                print(f"== {title}", flush=True)
                self.guarded(title, fn)


class StepError(Exception):
    """A step failed in a known way: the message is the table's detail."""


def words_per_second(records):
    """Words over seconds of every logged update after the first (whose time includes set-up)."""
    timed = [r for r in records if r.get("num_updates", 0) > 1 and r.get("wps", 0) > 0]
    if not timed:
        return None
    return sum(r["wpb"] for r in timed) / sum(r["wpb"] / r["wps"] for r in timed)


def compare_checkpoints(path_a, path_b):
    """(identical tensors, all tensors, worst difference) of two checkpoints, each consolidated
    from its expert shards: every parameter compared bit for bit."""
    import torch

    from ..checkpoint.io import read_checkpoint  # torch only: no fairseq import to wait for
    from ..checkpoint.sharded import resolve_experts

    a, b = (resolve_experts(read_checkpoint(str(p)), str(p), rank=0, world_size=1)["model"] for p in (path_a, path_b))
    if a.keys() != b.keys():
        return 0, len(a.keys() | b.keys()), f"parameter names differ: {sorted(a.keys() ^ b.keys())[:3]}"
    same, worst, worst_name = 0, 0.0, None
    for name in a:
        x, y = a[name], b[name]
        if x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y):
            same += 1
            continue
        diff = (x.double() - y.double()).abs().max().item() if x.shape == y.shape else math.inf
        if worst_name is None or diff > worst:
            worst, worst_name = diff, name
    return same, len(a), f"max |diff| {worst:.3g} in {worst_name}" if worst_name else "identical"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--nprocs", type=int, required=True, help="processes (GPUs) of the torchrun steps")
    p.add_argument("--work", required=True, help="directory for data, checkpoints and logs")
    p.add_argument("--rows", required=True, help="file the result rows are appended to")
    p.add_argument("--steps", default="5678", help="which of the steps 5-8 to run")
    p.add_argument("--quick", action="store_true", help="smallest settings: 3 updates, one direction")
    p.add_argument("--updates", type=int, default=40, help="updates of each training run without --quick (40)")
    args = p.parse_args(argv)
    if args.nprocs < 1:
        p.error(f"--nprocs must be >= 1 (got {args.nprocs})")
    if args.updates < 2:
        p.error(f"--updates must be >= 2 (got {args.updates})")
    return args


def cli_main(argv=None):
    Check(parse_args(argv)).main()


if __name__ == "__main__":
    cli_main()
