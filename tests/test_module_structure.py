"""The package's modules form a tree: no import cycle, and every module imports on its own.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import`` of a
``layersel_ext`` module, at module level or inside a function (a lazy import that holds a cycle
apart is still a cycle), relative or absolute. An edge goes to the module named, or to the
submodule when a name imported from a package is one (``from . import ops``). The package's own
``__init__`` is a node like any other; importing a submodule is not counted as importing its
package's ``__init__`` (Python runs it first, but it is not a dependency the module chose).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import layersel_ext

PACKAGE = "layersel_ext"
ROOT = Path(layersel_ext.__file__).resolve().parent
# Compiled modules: leaves of the graph (no Python source, they import no module of the package).
EXTENSIONS = ("layersel_ext._C",)


def _module_names() -> dict[str, Path]:
    """Dotted name -> source file of every module of the package (packages by their ``__init__``)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _graph_nodes() -> dict[str, Path | None]:
    return {**_module_names(), **dict.fromkeys(EXTENSIONS)}


def _imported(name: str, path: Path, modules: dict[str, Path | None]) -> set[str]:
    """The package's modules that module ``name`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(target: str) -> None:
        # The longest prefix that is one of our modules (``import layersel_ext.ops.x`` -> layersel_ext.ops).
        parts = target.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts:
            found.add(".".join(parts))

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                base_parts = package[: len(package) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base)
    found.discard(name)  # a package's __init__ importing a name it defines itself
    return found


def import_graph() -> dict[str, set[str]]:
    nodes = _graph_nodes()
    return {name: set() if path is None else _imported(name, path, nodes) for name, path in nodes.items()}


def cyclic_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or of one module that imports
    itself (Tarjan's algorithm): each module of one is on an import cycle with the others."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def shortest_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest import path from the component's first module back to itself (breadth first)."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier and start not in previous:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w not in previous:
                    previous[w] = v
                    following.append(w)
        frontier = following
    path = [start]
    v = previous[start]
    while v != start:
        path.append(v)
        v = previous[v]
    return [start, *reversed(path[1:]), start]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per cyclic component."""
    return [shortest_cycle(graph, component) for component in cyclic_components(graph)]


def test_find_cycles_finds_lazy_and_long_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert sorted(map(tuple, find_cycles(graph))) == [("a", "b", "c", "a"), ("d", "d")]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_graph_reads_every_kind_of_import() -> None:
    # The reader, on edges the package's own source must produce.
    graph = import_graph()
    assert f"{PACKAGE}.ops" in graph[PACKAGE]  # from .ops import ... in __init__
    assert f"{PACKAGE}._loader" in graph[f"{PACKAGE}.ops"]  # from . import _loader
    assert f"{PACKAGE}.bench.run" in graph[f"{PACKAGE}.__main__"]  # a function-level absolute import
    assert f"{PACKAGE}.bench.zoo" in graph[f"{PACKAGE}.bench.run"]  # from . import zoo inside a subpackage


def test_no_import_cycles() -> None:
    graph = import_graph()
    components = cyclic_components(graph)
    assert not components, "import cycles (function-level imports counted):\n" + "\n".join(
        f"{' -> '.join(shortest_cycle(graph, c))}  (modules on cycles with each other: {', '.join(c)})"
        for c in components
    )


# Imports torch (the slow part) once, then each module in a forked child that has imported no
# module of the package: every child is a fresh interpreter as far as layersel_ext is concerned.
_IMPORT_EACH = """
import importlib, json, os, sys, traceback
import numpy, torch
assert not [m for m in sys.modules if m == "layersel_ext" or m.startswith("layersel_ext.")]
failures = {}
for name in json.loads(sys.argv[1]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc().encode())
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failures[name] = message or f"exit status {status}"
print(json.dumps(failures))
"""


def test_every_module_imports_alone() -> None:
    names = sorted(_module_names())
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, json.dumps(names)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT.parent,
    )
    assert done.returncode == 0, done.stderr
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(f"import {name} failed:\n{message}" for name, message in failures.items())
