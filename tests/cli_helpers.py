"""Run fairseq's real command lines on tiny generated data (helpers for the end-to-end tests)."""
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

from moe_fairseq.experiments.launch import free_port  # noqa: F401  (the tests import it from here)

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "moe_fairseq")
BIN = Path(sys.executable).parent


def cli(name: str) -> str:
    """The console script installed beside this Python (fairseq-train, fairseq-generate, ...)."""
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not installed beside {sys.executable}")
    return str(path)


def torchrun_cmd(cmd, nproc=2):
    """A command (fairseq-train, or a script) under torchrun: the launcher script path replaces argv[0]."""
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *cmd]


def descendants(pid):
    """Every process below `pid` (torchrun starts its workers in sessions of their own, so
    killing the launcher's process group would leave the ranks running)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc):
    """SIGKILL a process started with start_new_session=True and everything below it, then reap it."""
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run(cmd, check=True, timeout=600, env=None):
    """Run a command line to completion; on timeout kill it and every process below it (torchrun's
    ranks live in sessions of their own) and raise subprocess.TimeoutExpired.  This checkout
    comes first on PYTHONPATH, so console scripts (moe-consolidate, ...) run the code under test
    even when the environment's editable install points at another checkout."""
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH")) if p)
    args = [str(c) for c in cmd]
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                          start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(popen)
            try:  # a process that left the tree (reparented) may still hold the pipes open
                stdout, stderr = popen.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                stdout, stderr = "", ""
            raise subprocess.TimeoutExpired(args, timeout, stdout, stderr) from None
        except BaseException:  # KeyboardInterrupt, a failing fixture: leave nothing running
            kill_tree(popen)
            raise
    proc = subprocess.CompletedProcess(args, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def make_tiny_corpus(root: Path, targets=("de", "fr"), n_train=400, seed=0) -> Path:
    """A word-substitution + reversal 'language' per target, binarized with one shared dict."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(40)]
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", 40), ("test", 40)):
        src = [[rng.choice(words) for _ in range(rng.randint(3, 8))] for _ in range(n)]
        (raw / f"{split}.en").write_text("\n".join(" ".join(s) for s in src) + "\n")
        for lang in targets:
            lines = (" ".join(f"{lang}{w[1:]}" for w in reversed(s)) for s in src)
            (raw / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    vocab = {}
    for path in raw.glob("train.*"):
        for tok in path.read_text().split():
            vocab[tok] = vocab.get(tok, 0) + 1
    dict_path = raw / "dict.txt"
    dict_path.write_text("".join(f"{t} {c}\n" for t, c in sorted(vocab.items())))
    dest = root / "bin"
    for lang in targets:
        run([cli("fairseq-preprocess"), "--source-lang", "en", "--target-lang", lang,
             "--trainpref", raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test",
             "--srcdict", dict_path, "--tgtdict", dict_path, "--destdir", dest, "--workers", "1"])
    return dest


# MoE training without a random draw (dropout off, top-2 with a deterministic second expert, no
# jitter, no gating dropout) in batches of 8 sentences: runs on 1 and 2 ranks over the same global
# batches (1 process with --update-freq 2) must give the same model.
DETERMINISTIC_MOE = ["--moe-expert-count", "4", "--moe-router", "top2", "--moe-second-expert-policy", "all",
                     "--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0",
                     "--max-sentences", "8", "--required-batch-size-multiple", "1"]


def lang_pairs(targets=("de", "fr")):
    return ",".join(f"en-{t}" for t in targets)


def train_cmd(data: Path, save_dir: Path, *extra, max_update=12, targets=("de", "fr")):
    return [cli("fairseq-train"), data, "--user-dir", USER_DIR, "--task", "translation_multi_moe",
            "--lang-pairs", lang_pairs(targets), "--encoder-langtok", "src", "--decoder-langtok",
            "--arch", "transformer_moe_tiny", "--criterion", "moe_label_smoothed_cross_entropy",
            "--label-smoothing", "0.1", "--optimizer", "adam", "--lr", "0.002", "--max-tokens", "800",
            "--max-update", str(max_update), "--save-dir", save_dir, "--cpu", "--num-workers", "0",
            "--log-format", "simple", "--log-interval", "1", "--no-progress-bar", "--seed", "3",
            "--no-epoch-checkpoints", *extra]


def generate_cmd(data: Path, checkpoint: Path, *extra, target="de", targets=("de", "fr")):
    return [cli("fairseq-generate"), data, "--user-dir", USER_DIR, "--task", "translation_multi_moe",
            "--lang-pairs", lang_pairs(targets), "--encoder-langtok", "src", "--decoder-langtok",
            "--source-lang", "en", "--target-lang", target, "--path", checkpoint, "--gen-subset", "test",
            "--beam", "2", "--batch-size", "16", "--cpu", *extra]


def hypotheses(generate_stdout: str):
    """{sentence id: hypothesis} from fairseq-generate's H- lines."""
    out = {}
    for line in generate_stdout.splitlines():
        m = re.match(r"^H-(\d+)\t(\S+)\t(.*)$", line)
        if m:
            out[int(m.group(1))] = (float(m.group(2)), m.group(3))
    return out


def last_value(log: str, key: str):
    vals = re.findall(rf"\b{key}[= ]([0-9.e+-]+)", log)
    return float(vals[-1]) if vals else None
