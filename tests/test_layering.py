"""The package's import map: no module imports itself back (no cycles), and each layer imports only layers below it.

Read from the source with ``ast`` (nothing is imported): every ``import`` / ``from ... import``
anywhere in a module counts, inside functions too (a lazy import is still a dependency),
except under ``if TYPE_CHECKING:``. Importing ``a.b.c`` loads the packages ``a`` and ``a.b``
first; those implicit parent edges are left out, as every package ``__init__`` that
re-exports its modules would otherwise be a cycle.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "flexcp"
LAYERS = ("clihelp", "mask", "kernels", "sharding", "comm", "dist_attn", "runtime", "hf", "train", "magi_attn_utils", "bench",
          "cli")
"""Bottom to top (docs/ARCHITECTURE.md). ``flexcp/__init__.py``, ``flexcp/cli.py`` and ``example.py`` are the top."""


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every ``.py`` under flexcp/."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[: -len(".py")].split(os.sep)
                out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(dirpath, f)
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def import_map() -> dict[str, set[str]]:
    """Module -> the flexcp modules it imports (a ``from pkg import name`` of a submodule counts as that module)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        here = name if is_pkg else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in _import_nodes(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = here.split(".")
                    anchor = parts[: len(parts) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # `import flexcp.x.y` where y is a name: its module
                    t = t.rpartition(".")[0]
                if t.split(".")[0] == PACKAGE and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int:
    """Position in LAYERS (``flexcp.cli`` is the cli layer); ``flexcp`` and ``flexcp.example`` rank above all."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def test_import_map_is_read():
    graph = import_map()
    assert "flexcp.train.loop" in graph and "flexcp.train.config" in graph["flexcp.train.loop"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


KNOWN_CYCLES: dict[str, str] = {}
"""Layers with a cycle someone is removing: a strict xfail, so the test fails once the cycle is gone."""


@pytest.mark.parametrize("layer", [pytest.param(x, marks=pytest.mark.xfail(reason=KNOWN_CYCLES[x], strict=True))
                                   if x in KNOWN_CYCLES else x for x in LAYERS])
def test_no_import_cycles(layer):
    cycles = [c for c in find_cycles(import_map()) if any(layer_of(m) == LAYERS.index(layer) for m in c)]
    assert not cycles, "modules that import each other in a circle (through any path):\n" + "\n".join(
        "  " + " <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_layers_below(layer):
    bad = [f"{m} imports {d}"
           for m, deps in sorted(import_map().items()) if m.split(".")[1:2] == [layer]
           for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert not bad, f"layer {layer!r} imports layers above it (order: {', '.join(LAYERS)}):\n  " + "\n  ".join(bad)
