"""Layering of src/twinvol: no import cycle (imports inside functions and type-only
imports count: a lower layer that needs a type from above takes a Protocol), arrows go
node -> replication -> core and never back, and modules stay small.

OVERSIZED is the debt of modules over the size limit, each at most its current size:
split them (and lower or drop their entry), never let one grow."""

from __future__ import annotations

import ast
import pathlib

SRC = pathlib.Path(__file__).parents[2] / "src"

MAX_LINES = 520
OVERSIZED: dict[str, int] = {}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t in files and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle() -> None:
    assert [sorted(c) for c in cycles(import_graph())] == []


def test_replication_never_imports_the_node_and_the_core_imports_only_itself() -> None:
    graph = import_graph()
    for mod, targets in graph.items():
        if mod.startswith("twinvol.replication"):
            assert not {t for t in targets if t.startswith("twinvol.node")}, mod
        if mod.startswith("twinvol.replication.core"):
            assert {t for t in targets if not t.startswith("twinvol.replication.core")} \
                == set(), mod


def test_modules_stay_small() -> None:
    too_big = {}
    for path in sorted((SRC / "twinvol").rglob("*.py")):
        rel = str(path.relative_to(SRC))
        lines = len(path.read_text().splitlines())
        if lines > OVERSIZED.get(rel, MAX_LINES):
            too_big[rel] = lines
    assert too_big == {}, f"modules over their limit ({MAX_LINES} lines, or OVERSIZED)"
