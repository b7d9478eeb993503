"""The package's shape: no import cycle, every layer states its rule, no huge module.

The layer contract itself is ``lint-imports`` (``[tool.importlinter]`` in pyproject.toml).
This test adds what a layers contract cannot say: no two modules import each other by any
path, inside one layer included, counting imports inside functions and under
``TYPE_CHECKING`` (grimp reads them all).
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

import preloader

PACKAGE = Path(preloader.__file__).parent
MAX_LINES = 500


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, or one that
    imports itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(start: str) -> None:
        # Iterative: a recursive walk over a long import chain could hit the limit.
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append(
                        (child, iter(sorted(graph.find_modules_directly_imported_by(child))))
                    )
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph.find_modules_directly_imported_by(node):
                        found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def describe(graph: grimp.ImportGraph, component: list[str]) -> str:
    members = set(component)
    edges = []
    for importer in component:
        for imported in sorted(graph.find_modules_directly_imported_by(importer) & members):
            lines = graph.get_import_details(importer=importer, imported=imported)
            where = ", ".join(str(d["line_number"]) for d in lines)
            edges.append(f"  {importer} -> {imported} (line {where})")
    return "\n".join(edges)


def test_the_package_has_no_import_cycle() -> None:
    graph = grimp.build_graph("preloader", cache_dir=None)
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles:\n" + "\n\n".join(describe(graph, c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle() -> None:
    # The check above is only as good as this: a function-level import that closes a
    # loop (kernel -> engine -> kernel) must be reported.
    graph = grimp.build_graph("preloader", cache_dir=None)
    graph.add_import(
        importer="preloader.kernel.procfs",
        imported="preloader.engine.warm",
        line_number=1,
        line_contents="from ..engine import warm",
    )
    cycles = strongly_connected(graph)
    assert any({"preloader.kernel.procfs", "preloader.engine.warm"} <= set(c) for c in cycles)


def subpackages() -> list[Path]:
    return sorted(init.parent for init in PACKAGE.rglob("__init__.py") if init.parent != PACKAGE)


def test_every_subpackage_states_its_import_rule() -> None:
    assert {p.relative_to(PACKAGE).as_posix() for p in subpackages()} >= {
        "agent",
        "cli",
        "engine",
        "kernel",
        "planning",
        "serve",
        "serve/kube",
    }
    for package in subpackages():
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc and "Import rule:" in doc, f"{package}: no 'Import rule:' in its docstring"


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {
        path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
