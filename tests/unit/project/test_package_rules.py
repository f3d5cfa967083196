"""The package's house rules, read from its source with ``ast`` (nothing is imported or run).

No module over MAX_LINES lines; libvirt imported only under ``virt_reclaim/virt``; no import
cycle among the package's modules at import time. The import graph has an edge from a module
to each package module it imports at its top level: imports inside functions and under
``if TYPE_CHECKING:`` do not run at import, so they cannot close a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SOURCE = ROOT / "daemon"
PACKAGE = SOURCE / "virt_reclaim"
VIRT = PACKAGE / "virt"
MAX_LINES = 400


def module_name(path: Path) -> str:
    """``virt_reclaim.service.windows`` for its file; a package's name for its ``__init__``."""
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def top_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported.

    Functions' bodies do not run then, nor ``if TYPE_CHECKING:`` (its ``else`` does); the
    bodies of classes, ``try``, ``with`` and other ``if`` blocks do.
    """
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
        else:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    pending.append(child)
                elif isinstance(child, ast.ExceptHandler):
                    pending.extend(child.body)


def imported_names(
    node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, known: Collection[str]
) -> set[str]:
    """The dotted names of what an import statement loads.

    ``from a import b`` loads the module ``a.b`` when there is one, else a name of ``a``.
    """
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = node.module or ""
    if node.level:  # relative: from the importer's package, up level - 1 more
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join([*anchor, *([base] if base else [])])
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}


def import_graph(found: dict[str, Path]) -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports at import time."""
    graph: dict[str, set[str]] = {}
    for name, path in found.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in top_level_imports(tree):
            targets |= imported_names(node, name, is_package, found.keys())
        graph[name] = (targets & found.keys()) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as the modules along it (first repeated at the end), or None."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        # A depth-first walk; ``path`` holds the modules being walked, each with what is left.
        path: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        while path:
            node, children = path[-1]
            child = next(children, None)
            on_path = [n for n, _ in path]
            if child is None:
                path.pop()
                done.add(node)
            elif child in on_path:
                return [*on_path[on_path.index(child) :], child]
            elif child not in done:
                path.append((child, iter(sorted(graph[child]))))
    return None


def imports_libvirt(tree: ast.Module) -> list[int]:
    """The lines that import libvirt or its modules (libvirt_qemu...), anywhere in the module."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        if any(name.split(".")[0].startswith("libvirt") for name in names):
            lines.append(node.lineno)
    return lines


def test_no_module_is_over_the_line_limit() -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for path in modules().values()
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"over {MAX_LINES} lines: {long}"


def test_only_the_virt_package_imports_libvirt() -> None:
    found = {
        f"{path.relative_to(ROOT)}:{line}"
        for path in modules().values()
        if not path.is_relative_to(VIRT)
        for line in imports_libvirt(ast.parse(path.read_text()))
    }
    assert found == set()
    # The check sees the imports it is meant to see.
    assert imports_libvirt(ast.parse((VIRT / "domain.py").read_text()))


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph(modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_has_the_edges_it_should_and_not_the_ones_it_should_not() -> None:
    graph = import_graph(modules())
    # ``from virt_reclaim.service import ... windows ...`` at the top of daemon.py.
    assert "virt_reclaim.service.windows" in graph["virt_reclaim.service.daemon"]
    # ``from virt_reclaim import __version__`` is an import of the package itself.
    assert "virt_reclaim" in graph["virt_reclaim.cli.parsing"]
    # status.py imports the daemon only for typing, and dispatch.py likewise.
    assert "virt_reclaim.service.daemon" not in graph["virt_reclaim.service.status"]
    assert "virt_reclaim.service.daemon" not in graph["virt_reclaim.service.dispatch"]


def test_a_cycle_is_found_and_named() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import a.b\n"
        "from . import c\n"
        "if TYPE_CHECKING:\n    import a.d\n"
        "def f() -> None:\n    import a.e\n"
    )
    known = {"a", "a.b", "a.c", "a.d", "a.e", "a.x"}
    found = [imported_names(n, "a.x", False, known) for n in top_level_imports(tree)]
    names = set().union(*found)
    assert names == {"typing", "a.b", "a.c"}
    assert names.isdisjoint({"a.d", "a.e"})
    graph = {"a": set(), "a.b": {"a.c"}, "a.c": {"a.x"}, "a.x": {"a.b"}, "a.y": {"a.b"}}
    assert find_cycle(graph) == ["a.b", "a.c", "a.x", "a.b"]
    assert find_cycle({"a.b": {"a.c"}, "a.c": set()}) is None
