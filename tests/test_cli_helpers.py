"""The helpers every end-to-end test relies on: a timed-out command leaves no process behind."""
import os
import subprocess
import sys
import time

import pytest

from cli_helpers import REPO, run

# A launcher whose child lives in a session of its own (as torchrun's ranks do) and outlives it.
LAUNCHER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(300)
"""


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_timeout_kills_the_whole_process_tree():
    start = time.time()
    with pytest.raises(subprocess.TimeoutExpired) as err:
        run([sys.executable, "-c", LAUNCHER], timeout=5)
    assert time.time() - start < 60
    child = int(err.value.stdout.split()[0])
    deadline = time.time() + 10
    while alive(child) and time.time() < deadline:
        time.sleep(0.2)
    assert not alive(child), f"the launcher's child {child} survived the timeout"


def test_commands_import_this_checkout():
    """Console scripts (moe-consolidate, ...) run the code under test, not another checkout's."""
    proc = run([sys.executable, "-P", "-c", "import moe_fairseq; print(moe_fairseq.__file__)"])  # -P: no cwd
    assert os.path.dirname(os.path.dirname(proc.stdout.strip())) == str(REPO)
