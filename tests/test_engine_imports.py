"""The grid engine (experiments/engine/) is a package of small modules with one job each: no module imports
one that imports it back (directly or through others), every module imports on its own in a fresh
interpreter without starting Ray, and no module of experiments/ or core/ compares stage names (the
stage registry, core/stages.py, says what differs between stages)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENGINE = REPO / "experiments" / "engine"
MODULES = sorted(f"experiments.engine.{p.stem}" for p in ENGINE.glob("*.py") if p.stem != "__init__")


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def engine_imports(path: Path) -> set[str]:
    """The experiments.engine modules `path` imports anywhere (lazy imports in functions too), except under
    `if TYPE_CHECKING:` (annotations only, never run)."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "experiments.engine":
                out.update(f"experiments.engine.{a.name}" for a in node.names)
            elif node.module.startswith("experiments.engine."):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("experiments.engine."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


def import_graph() -> dict[str, set[str]]:
    return {m: engine_imports(ENGINE / f"{m.rsplit('.', 1)[1]}.py") for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` (the modules along it, first repeated at the end), or []."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def dfs(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = dfs(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            found = dfs(m)
            if found:
                return found
    return []


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_engine_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert len(graph) >= 15 and "experiments.engine.cli" in graph
    for m, deps in graph.items():
        assert deps <= set(graph), (m, deps - set(graph))  # only real modules are imported
    assert find_cycle(graph) == []
    # the Tune trainable and the Ray Train workers share runner.py, and neither imports the other back
    assert "experiments.engine.runner" in graph["experiments.engine.ray_ddp"]
    assert "experiments.engine.trial" not in graph["experiments.engine.ray_ddp"]


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone_without_ray(module):
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import {module}; "
            "assert 'ray' not in sys.modules, 'imports ray at import time'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_only_the_stage_registry_compares_stage_names():
    pattern = re.compile(r"""[!=]=\s*["'](pretrain|segment)["']|["'](pretrain|segment)["']\s*[!=]=""")
    hits = []
    for root in ("experiments", "core"):
        for p in sorted((REPO / root).rglob("*.py")):
            if p == REPO / "core" / "stages.py":
                continue
            for i, line in enumerate(p.read_text().splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert hits == [], "read core/stages.py instead of comparing stage names:\n" + "\n".join(hits)
