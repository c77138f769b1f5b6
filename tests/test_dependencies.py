"""The dependency rules of docs/ARCHITECTURE.md, enforced on the source: every import in
moe_fairseq/ and data_prep/ (module level or inside a function, read with ast, nothing is
imported) must be one the rules allow.  The only upward import is the documented registration:
models/, criterions/ and tasks/ import the plugin in their __init__."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("moe_fairseq", "data_prep")

# unit -> the units it may import (besides itself); the table of docs/ARCHITECTURE.md
BASE = {"moe", "moe.errors"}
RULES = {
    "moe.errors": set(),
    "moe": {"moe.errors", "atomic_files"},  # host_syncs' command line writes its JSON atomically
    "atomic_files": {"moe.errors"},
    "cli_errors": {"moe.errors"},
    "console": set(),
    "checkpoint": BASE | {"atomic_files"},
    "fairseq_patches": BASE | {"atomic_files", "checkpoint", "cli_errors"},
    "distributed": BASE | {"models"},  # the ranks' agreement check reads models/moe_args.py's flags
    "models": BASE | {"distributed"},
    "criterions": BASE,
    "tasks": BASE | {"distributed", "models"},
    "plugin": {"fairseq_patches", "criterions", "models", "tasks"},
    "tools": BASE | {"atomic_files", "checkpoint", "console", "models", "tasks", "plugin", "data_prep"},
    "experiments": BASE | {"atomic_files", "checkpoint", "cli_errors", "console", "models", "tasks", "plugin",
                           "tools", "data_prep", "experiments.plots"},
    "experiments.plots": set(),  # log parsing and figures: no fairseq, nothing of the package
    "evaluate": {"tools"},  # `python -m moe_fairseq.evaluate`
    "moe_fairseq": set(),  # the package's __init__ imports nothing
    "data_prep": {"atomic_files", "console"},
}
# The registration: importing any of these packages registers (and patches) the whole plugin.
REGISTRATION = {("moe_fairseq.models", "moe_fairseq.plugin"), ("moe_fairseq.criterions", "moe_fairseq.plugin"),
                ("moe_fairseq.tasks", "moe_fairseq.plugin")}
# What runs without fairseq installed or imported (the offline checkpoint tools rely on it).
NO_FAIRSEQ = {"moe", "moe.errors", "checkpoint", "atomic_files", "cli_errors", "console", "experiments.plots"}
# Modules that are a unit of their own inside their package (a row of their own above).
OWN_UNIT = {"moe_fairseq.moe.errors": "moe.errors", "moe_fairseq.experiments.plots": "experiments.plots"}


def module_of(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def unit_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "data_prep" or len(parts) == 1:
        return parts[0]
    return OWN_UNIT.get(module, parts[1])


def imports(path: Path):
    """(line, imported module) of every import statement in `path`; `from X import a` counts as
    X.a when that is a module of ours (`from .. import plugin`), else as X."""
    module = module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield node.lineno, full if is_module(full) else base


def sources():
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def edges():
    """(file:line, importing module, imported module) for every import of one of our packages."""
    for path in sources():
        for line, target in imports(path):
            if target.split(".")[0] in PACKAGES:
                yield f"{path.relative_to(REPO)}:{line}", module_of(path), target


def test_every_unit_has_a_rule():
    """A new subpackage or top-level module needs its line in the rules (and in the docs)."""
    assert {unit_of(module_of(p)) for p in sources()} == set(RULES)


def test_imports_follow_the_rules():
    broken = [f"{where}: {src} imports {dst} ({unit_of(src)} may import {sorted(RULES[unit_of(src)]) or 'nothing'})"
              for where, src, dst in edges()
              if unit_of(dst) != unit_of(src) and unit_of(dst) not in RULES[unit_of(src)]
              and (src, dst) not in REGISTRATION]
    assert not broken, "\n".join(broken)


def test_only_the_registration_imports_the_plugin():
    # the programs (tools/, experiments/) register the plugin as any program using fairseq does
    importers = {(src, dst) for _, src, dst in edges()
                 if dst == "moe_fairseq.plugin" and unit_of(src) not in ("tools", "experiments")}
    assert importers == REGISTRATION


@pytest.mark.parametrize("unit", sorted(NO_FAIRSEQ))
def test_the_fairseq_free_parts_import_no_fairseq(unit):
    found = [f"{path.relative_to(REPO)}:{line}: {target}" for path in sources() if unit_of(module_of(path)) == unit
             for line, target in imports(path) if target.split(".")[0] in ("fairseq", "fairseq_cli", "omegaconf")]
    assert not found, "\n".join(found)
