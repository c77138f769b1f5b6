"""The shape of the code, read from the source with ast (nothing is imported or run):

- scripts/*.py are thin entry points: `import _bootstrap` (the one place that puts the checkout on
  sys.path), imports of public names of moe_fairseq, and a `__main__` call; the code they run
  lives in moe_fairseq/experiments/, where the tests import it;
- no function of moe_fairseq/, scripts/ or data_prep/ is over 80 lines."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
MAX_FUNCTION_LINES = 80
# Scripts that carry their code: bench_faults drives tests/fault_train.py with tests/cli_helpers.py,
# a test harness the package may not import.
NOT_YET_THIN = {"bench_faults"}


def scripts():
    return sorted(p.stem for p in SCRIPTS.glob("*.py") if p.stem != "_bootstrap")


def thin_problems(path: Path) -> list:
    """What makes `path` more than an entry point (empty for a thin script)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    problems = []
    body = tree.body[1:] if ast.get_docstring(tree) is not None else tree.body
    if not (body and isinstance(body[0], ast.Import) and [a.name for a in body[0].names] == ["_bootstrap"]):
        problems.append("its first statement is not `import _bootstrap`")
    for node in body[1:]:
        if isinstance(node, ast.ImportFrom):
            if not (node.module or "").startswith("moe_fairseq."):
                problems.append(f"line {node.lineno}: imports from {node.module}, not from moe_fairseq")
            problems += [f"line {node.lineno}: imports the private name {a.name}" for a in node.names
                         if a.name.startswith("_")]
        elif isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
            continue
        else:
            problems.append(f"line {node.lineno}: {type(node).__name__} (an entry point only imports and calls)")
    if any(isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name) and n.value.id == "sys"
           for n in ast.walk(tree)):
        problems.append("touches sys.path (scripts/_bootstrap.py does)")
    return problems


@pytest.mark.parametrize("name", scripts())
def test_scripts_are_thin_entry_points(name):
    problems = thin_problems(SCRIPTS / f"{name}.py")
    if name in NOT_YET_THIN:
        assert problems, f"scripts/{name}.py is thin now: remove it from NOT_YET_THIN"
    else:
        assert not problems, f"scripts/{name}.py: " + "; ".join(problems)


def test_the_thin_check_sees_a_script_with_code(tmp_path):
    fat = tmp_path / "fat.py"
    fat.write_text('"""doc"""\nimport _bootstrap\nimport sys\nfrom moe_fairseq.experiments.plots import _save\n\n'
                   'def main():\n    sys.path.insert(0, ".")\n')
    problems = thin_problems(fat)
    assert len(problems) == 4, problems  # `import sys`, the private name, the function, sys.path
    assert not thin_problems(SCRIPTS / "compare_runs.py")


def long_functions():
    found = set()
    for root in ("moe_fairseq", "scripts", "data_prep"):
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                        node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    found.add((str(path.relative_to(REPO)), node.name))
    return found


def test_no_function_is_over_80_lines():
    found = long_functions()
    assert not found, f"over {MAX_FUNCTION_LINES} lines (split into named steps): {sorted(found)}"


def script_loads(path: Path) -> list:
    """Lines of `path` that load a script by its path (spec_from_file_location, sys.path) rather
    than importing the package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            call = ast.unparse(node.func)
            if (call.endswith("spec_from_file_location") or call == "sys.path.insert") and \
                    "scripts" in ast.unparse(node):
                found.append(node.lineno)
    return found


def test_tests_import_the_package_not_scripts(tmp_path):
    loads = {p.name: script_loads(p) for p in sorted(Path(__file__).parent.glob("*.py"))}
    assert not {name: lines for name, lines in loads.items() if lines}
    bad = tmp_path / "t.py"
    bad.write_text('import sys\nsys.path.insert(0, str(REPO / "scripts"))\n')
    assert script_loads(bad) == [2]


def test_a_script_finds_the_checkout_without_installing_it(tmp_path):
    """python -S: no site-packages, so no installed moe_fairseq; the script's `import _bootstrap`
    alone finds this checkout (progress_view imports neither torch nor fairseq)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-S", str(SCRIPTS / "progress_view.py")], input='plain line\n',
                          capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "plain line\n"
