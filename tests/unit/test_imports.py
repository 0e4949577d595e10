"""No import cycles between outlierlab's modules: the graph of every import (module level, lazy
ones in functions, ``TYPE_CHECKING`` ones) is acyclic, and the config modules import on their own
in a fresh interpreter, in any order."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import outlierlab

ROOT = Path(outlierlab.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, name: str, is_pkg: bool, modules: set[str]) -> set[str]:
    """The outlierlab modules ``name`` imports anywhere: at module level, in functions (lazy
    imports) and under ``if TYPE_CHECKING:``; ``from a.b import c`` counts ``a.b.c`` if that is
    a module, else ``a.b``."""
    found: set[str] = set()
    for s in ast.walk(tree):
        if isinstance(s, ast.Import):
            found.update(a.name for a in s.names)
        elif isinstance(s, ast.ImportFrom):
            base = s.module or ""
            if s.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - s.level + 1] + ([base] if base else []))
            sub = {f"{base}.{a.name}" for a in s.names} & modules
            found.update(sub or {base})
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    return {name: _imports(ast.parse(path.read_text()), name, path.name == "__init__.py",
                           set(files))
            for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in state and (found := dfs(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := dfs(n)):
            return found
    return None


def test_import_graph_has_no_cycle():
    graph = _graph()
    assert "outlierlab.optim" in graph["outlierlab.config"]
    assert _cycle(graph) is None, " → ".join(_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("first", ["outlierlab.optim", "outlierlab.train.config",
                                   "outlierlab.config"])
def test_config_modules_import_first_in_a_fresh_interpreter(first):
    code = (f"import {first}, sys; import outlierlab.config, outlierlab.optim, "
            "outlierlab.train.config, outlierlab.train.loop")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_optimiser_registry_and_claims_do_not_import_torch():
    code = ("import sys, outlierlab.optim, outlierlab.experiments.claims, outlierlab.fields; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
