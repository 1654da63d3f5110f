"""The code's structure as the project promises it: every module a DVC stage runs is one of that stage's
dependencies (so a code change re-runs exactly the stages it can change), no import cycles, and no
module imports a stage's entry module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PIPELINES = [ROOT / "dvc.yaml", ROOT / "experiments" / "transfer" / "dvc.yaml"]


def module_files() -> dict[str, Path]:
    """psyface module name -> its file, for every module of the package."""
    modules = {}
    for path in (SRC / "psyface").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = module_files()


def imports_of(name: str) -> set[str]:
    """psyface modules `name` imports anywhere (top level or inside functions), with their packages."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith("psyface"):
                found.add(target)
                parts = target.split(".")
                found.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES)
    found.discard(name)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def docstring_only(path: Path) -> bool:
    """A package `__init__` holding nothing that runs (changing it cannot change a result)."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def closure(name: str) -> set[str]:
    seen, todo = {name}, [name]
    while todo:
        for dependency in GRAPH[todo.pop()] - seen:
            seen.add(dependency)
            todo.append(dependency)
    return seen


def stages() -> list[tuple[str, str, str, list[str]]]:
    """(pipeline, stage, module run, deps relative to the repository root) for every stage."""
    found = []
    for pipeline in PIPELINES:
        spec = yaml.safe_load(pipeline.read_text(encoding="utf-8"))
        for stage, body in spec["stages"].items():
            body = body.get("do", body)
            match = re.search(r"python -m (psyface[\w.]*)", body["cmd"])
            assert match, f"{pipeline.name}:{stage} does not run a psyface module: {body['cmd']!r}"
            module = match.group(1)
            if module not in MODULES or MODULES[module].name == "__init__.py":
                module = f"{module}.__main__" if f"{module}.__main__" in MODULES else module
            found.append((pipeline.relative_to(ROOT).as_posix(), stage, module, [str(d) for d in body.get("deps", [])]))
    return found


@pytest.mark.parametrize(("pipeline", "stage", "module", "deps"), stages(), ids=lambda v: v if isinstance(v, str) else "")
def test_stage_deps_cover_every_module_it_runs(pipeline, stage, module, deps):
    def covered(path: Path) -> bool:
        relative = path.relative_to(ROOT).as_posix()
        return any(relative == dep or relative.startswith(dep.rstrip("/") + "/") for dep in deps)

    missing = sorted(MODULES[name].relative_to(ROOT).as_posix() for name in closure(module)
                     if not covered(MODULES[name]) and not docstring_only(MODULES[name]))
    assert missing == [], f"{pipeline}:{stage} runs {module} but does not depend on {missing}"


def test_no_import_cycles():
    cycles = sorted({tuple(sorted(closure(a) & {b for b in MODULES if a in closure(b)})) for a in MODULES
                     if any(a in closure(b) for b in GRAPH[a])})
    assert cycles == []



def test_stages_share_code_through_core_modules_only():
    """No module imports a stage's entry module (what `dvc.yaml` runs, or what a stage package's
    `__main__` runs): stages exchange files and share code through core modules."""
    entries = {module for _, _, module, _ in stages()}
    entries |= {b for a in entries if a.endswith(".__main__") for b in GRAPH[a] if b.rpartition(".")[0] == a.rpartition(".")[0]}
    crossing = sorted((a, b) for a in MODULES for b in GRAPH[a] if b in entries
                      and not (a.endswith(".__main__") and a.rpartition(".")[0] == b.rpartition(".")[0]))
    assert crossing == []
