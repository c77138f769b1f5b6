"""Reliability timings: how long a 2-process expert-parallel fairseq-train (gloo, CPU) takes to
end after one rank dies or hangs inside an all-to-all (docs/benchmarks.md, "Reliability").

    python scripts/bench_faults.py [--repeats 3] [--cap 120] [--out docs/bench_faults.json]

Faults are injected by tests/fault_train.py in rank 1 at its first token exchange of update 4
(the tiny model and corpus of the tests).  The time is from the injection (a timestamp the
rank writes just before) to the exit of the launcher.  Cases, run interleaved, `repeats` times:

  kill/torchrun       SIGKILL, plain torchrun, no collective timeout
  kill/launcher       SIGKILL, scripts/train_torchrun.sh (torchrun + --collective-timeout 600)
  hang/timeout10      the rank sleeps forever, --collective-timeout 10
  stop/timeout10      the rank stops itself (SIGSTOP, a frozen host), --collective-timeout 10
  hang/heartbeat10    the rank sleeps forever, fairseq's --heartbeat-timeout 10 only (its thread
                      interrupts the sleeping rank itself)
  stop/heartbeat10    SIGSTOP, --heartbeat-timeout 10 only: the stopped rank runs no thread and
                      the other is blocked in gloo; the job is killed after --cap seconds if it
                      has not ended (reported as "> cap")
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from moe_fairseq.atomic_files import atomic_write_json  # noqa: E402
from cli_helpers import BIN, free_port, kill_tree, make_tiny_corpus, torchrun_cmd, train_cmd  # noqa: E402

FAULT_TRAIN = REPO / "tests" / "fault_train.py"
FLAGS = ["--moe-expert-count", "4", "--moe-router", "top2", "--moe-gating-dropout", "0.3", "--dropout", "0.0",
         "--save-interval-updates", "2", "--disable-validation"]


def case_command(case, data, save, tmp):
    cmd = train_cmd(data, save, *FLAGS, max_update=50)
    if case == "kill/launcher":
        config = tmp / "bench.args"
        i = cmd.index("--save-dir")
        config.write_text("\n".join(map(str, cmd[4:i] + cmd[i + 2:])))
        env = dict(CPU="1", NPROC="2", TORCHRUN=str(BIN / "torchrun"), FAIRSEQ_TRAIN=str(FAULT_TRAIN),
                   MASTER_PORT=str(free_port()), MOE_FAULT_KILL="1:3")
        return ["bash", str(REPO / "scripts" / "train_torchrun.sh"), str(config), str(data), str(save)], env
    cmd[0] = str(FAULT_TRAIN)
    extra, env = {
        "kill/torchrun": ([], dict(MOE_FAULT_KILL="1:3")),
        "hang/timeout10": (["--collective-timeout", "10"], dict(MOE_FAULT_STALL="1:3")),
        "stop/timeout10": (["--collective-timeout", "10"], dict(MOE_FAULT_STALL="1:3:2:stop")),
        "hang/heartbeat10": (["--heartbeat-timeout", "10"], dict(MOE_FAULT_STALL="1:3")),
        "stop/heartbeat10": (["--heartbeat-timeout", "10"], dict(MOE_FAULT_STALL="1:3:2:stop")),
    }[case]
    return [str(c) for c in torchrun_cmd(cmd + extra)], env


def measure(case, data, tmp, cap):
    save = tmp / f"run-{time.monotonic_ns()}"
    stamp = tmp / "fault.time"
    if stamp.exists():
        stamp.unlink()
    cmd, env = case_command(case, data, save, tmp)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MOE_FAULT_STAMP=str(stamp), **env)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    capped = False
    while proc.poll() is None:
        time.sleep(0.05)
        if stamp.exists() and time.time() - float(stamp.read_text() or "inf") > cap:
            capped = True
            kill_tree(proc)
    end = time.time()
    if not stamp.exists():
        raise RuntimeError(f"{case}: the fault was never injected (exit code {proc.returncode})")
    return {"seconds": round(end - float(stamp.read_text()), 2), "capped": capped, "returncode": proc.returncode}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cap", type=float, default=120, help="seconds after the fault before a job is killed")
    p.add_argument("--cases", default="kill/torchrun,kill/launcher,hang/timeout10,stop/timeout10,hang/heartbeat10,"
                                       "stop/heartbeat10")
    p.add_argument("--out", default=str(REPO / "docs" / "bench_faults.json"))
    args = p.parse_args()
    cases = args.cases.split(",")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = make_tiny_corpus(tmp / "corpus")
        results = {case: [] for case in cases}
        for _ in range(args.repeats):
            for case in cases:  # interleaved: load on the host affects every case alike
                results[case].append(measure(case, data, tmp, args.cap))
                print(case, results[case][-1], flush=True)
    summary = {case: {"median_s": statistics.median(r["seconds"] for r in runs),
                      "max_s": max(r["seconds"] for r in runs), "capped": sum(r["capped"] for r in runs),
                      "nonzero_exit": sum(r["returncode"] != 0 for r in runs), "runs": runs}
               for case, runs in results.items()}
    print("\n| case | median s | max s | ended non-zero | killed at the cap |\n|---|---|---|---|---|")
    for case, s in summary.items():
        median = f"> {args.cap:g}" if s["capped"] == len(s["runs"]) else f"{s['median_s']:.1f}"
        print(f"| {case} | {median} | {s['max_s']:.1f} | {s['nonzero_exit']}/{len(s['runs'])} | "
              f"{s['capped']}/{len(s['runs'])} |")
    atomic_write_json(args.out, {"command": " ".join(sys.argv), "cap_s": args.cap, "cases": summary})


if __name__ == "__main__":
    main()
