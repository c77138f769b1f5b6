"""The moe-* console scripts print no third-party noise (fairscale's import-time FutureWarnings
about torch.cuda.amp.custom_fwd/custom_bwd), and only those warnings are silenced."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY = re.compile(r'"(moe-[a-z]+)=([\w.]+):(\w+)"')
SCRIPTS = ENTRY.findall((REPO / "setup.py").read_text())


def clean_env():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("PYTHONWARNINGS", None)  # the warnings must be silenced by the scripts themselves
    return env


def test_moe_evaluate_help_by_name_prints_no_warning():
    exe = Path(sys.executable).parent / "moe-evaluate"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=clean_env(), cwd=REPO)
    assert proc.returncode == 0 and "usage" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("name,module,func", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_every_console_script_starts_without_warnings(name, module, func):
    """What the installed script does (import the entry point, call it), on this checkout."""
    code = f"import sys; from {module} import {func}; sys.argv[0] = {name!r}; sys.exit({func}())"
    proc = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True,
                          env=clean_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr, proc.stderr
    assert f"usage: {name}" in proc.stdout or "usage:" in proc.stdout


def test_the_filter_is_targeted():
    """Another FutureWarning, or the same text from another module, still shows."""
    code = ("import warnings; from moe_fairseq.console import quiet_third_party_warnings\n"
            "quiet_third_party_warnings()\n"
            "warnings.warn('`torch.cuda.amp.custom_fwd(args...)` is deprecated', FutureWarning)\n"
            "warnings.warn('something else', FutureWarning)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env())
    assert proc.stderr.count("FutureWarning") == 2, proc.stderr


def test_setup_lists_every_console_script():
    assert sorted(s[0] for s in SCRIPTS) == ["moe-average", "moe-consolidate", "moe-evaluate", "moe-prepare",
                                            "moe-prune", "moe-quantize", "moe-reshard"]
    assert all(module == "moe_fairseq.console" for _, module, _ in SCRIPTS)


@pytest.mark.parametrize("module", ["moe_fairseq.evaluate", "moe_fairseq.tools.evaluate", "moe_fairseq.tools.prune",
                                    "moe_fairseq.tools.average", "moe_fairseq.tools.consolidate",
                                    "moe_fairseq.tools.reshard"])
def test_python_dash_m_runs_each_tool(module):
    """`python -m moe_fairseq.evaluate` (configs/README.md) still runs moe-evaluate, and every
    tool runs as `python -m moe_fairseq.tools.<name>`."""
    spec = f"import importlib.util; print(importlib.util.find_spec({module!r}).origin)"
    where = subprocess.run([sys.executable, "-c", spec], capture_output=True, text=True, env=clean_env(), cwd=REPO)
    assert where.stdout.strip().startswith(str(REPO / "moe_fairseq")), where.stdout + where.stderr  # not another install's
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", module, "--help"], capture_output=True, text=True,
                          env=clean_env(), cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr[-2000:]
