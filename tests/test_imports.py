"""The package's import graph has no circle: every import between two ``peft_sparse`` modules, at module level or
inside a function (a lazy import hides a circle, it does not remove it), points one way."""

from __future__ import annotations

import ast
from pathlib import Path

import peft_sparse

PACKAGE = Path(peft_sparse.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _targets(module: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The ``peft_sparse`` modules an import statement in ``module`` loads by name (a package's ``__init__`` runs
    before any of its modules, but that is Python's order, not an edge of ours)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    found = set()
    for alias in node.names:
        name = f"{base}.{alias.name}"
        found.add(name if name in modules else base)
    return {target for target in found if target in modules}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(module, path, node, modules)
        graph[module] = edges - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as a list of modules (the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_circle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_relative_lazy_and_package_imports():
    graph = import_graph()
    assert "peft_sparse.tuner.config" in graph["peft_sparse.tuner"]  # from .config import ... in __init__
    assert "peft_sparse.selection.backward" in graph["peft_sparse.selection.synflow"]
    assert "peft_sparse.cli.sft" in graph["peft_sparse.cli"]  # a lazy `from . import sft` inside a function


def test_peft_sparse_has_no_import_circle():
    assert find_cycle(import_graph()) is None
