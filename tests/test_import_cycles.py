"""No import circle among the installed package's modules.

The graph has an arrow A -> B for every import of package module B written in A: at the top of the module, in a
block or class body, and inside functions too (a function-level import that breaks a circle at import time is
still the circle), but not under ``if TYPE_CHECKING:`` (never run). ``from P import name`` points at ``P.name``
when that is a module of the package, else at ``P``. A package's ``__init__`` is not counted as imported by its
submodules (Python runs it first, but it is not a dependency the submodule chose).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# Known circles, each naming where its removal is planned; an entry that no longer matches fails the test.
ALLOWED: dict[frozenset[str], str] = {
    frozenset({"kvpress_like.adapters", "kvpress_like.plugins"}): (
        "issue 27 helper report (evaluation split): the adapter lookups moved to kvpress_like.plugins; "
        "adapters.py re-exports them until compressor.py, prefill.py, progressive.py, "
        "scorers/expected_attention.py and tests/test_query_tap.py import them from kvpress_like.plugins"
    ),
    frozenset({"kvpress_like.eval.ruler", "kvpress_like.eval.tasks"}): (
        "issue 27 helper report: tasks.py registers RULER's generators from eval/ruler.py, which imports "
        "tasks.py (commits 95806eb/69acff8, another helper's files)"
    ),
}


def package_modules() -> dict[str, Path]:
    """Every module of the installed package's packages (as ``pyproject.toml`` lists them) -> its file."""
    packages = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"]
    found = {}
    for package in packages:
        module = importlib.import_module(package)
        found[package] = Path(module.__file__)
        for info in pkgutil.iter_modules(module.__path__, f"{package}."):
            if not info.ispkg:
                found[info.name] = Path(importlib.util.find_spec(info.name).origin)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(body: list[ast.stmt]):
    """Every statement of ``body``, nested ones included, except those under ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _statements(node.orelse)
            continue
        yield node
        blocks = [getattr(node, name) for name in ("body", "orelse", "finalbody")
                  if isinstance(getattr(node, name, None), list)]
        for block in [*blocks, *(handler.body for handler in getattr(node, "handlers", []))]:
            yield from _statements(block)


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules that module ``name`` (source ``path``) imports anywhere outside TYPE_CHECKING blocks."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in _statements(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return {target for target in targets if target in modules and target != name}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    names = set(modules)
    return {name: imported_modules(name, path, names) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (or a module importing itself), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_package_has_no_import_circle():
    modules = package_modules()
    assert {"kvpress_like.eval.runner", "kvpress_like.methods.dapq", "kvpress_like.scorers.attention"} <= set(modules)
    found = {frozenset(component): component for component in cycles(import_graph(modules))}
    unexpected = [component for key, component in found.items() if key not in ALLOWED]
    assert not unexpected, f"import circles: {unexpected}"
    stale = [sorted(key) for key in ALLOWED if key not in found]
    assert not stale, f"allowed circles that no longer exist (remove them from ALLOWED): {stale}"


def test_the_walk_finds_circles_through_functions_and_skips_type_checking(tmp_path):
    """The checker itself: a circle through a top-level import, a ``try`` block and a function-level import is
    found; an import under TYPE_CHECKING is no arrow."""
    files = {
        "pkg": "",
        "pkg.a": "from pkg import b\n",
        "pkg.b": "try:\n    from pkg.c import thing\nexcept ImportError:\n    pass\n",
        "pkg.c": "def later():\n    from . import a\n",
        "pkg.d": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n",
        "pkg.e": "import pkg.d\n",
    }
    modules = {}
    for name, text in files.items():
        path = tmp_path / ("__init__.py" if name == "pkg" else name.replace(".", "_") + ".py")
        path.write_text(text)
        modules[name] = path
    graph = import_graph(modules)
    assert graph["pkg.c"] == {"pkg.a"} and graph["pkg.b"] == {"pkg.c"} and graph["pkg.d"] == set()
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
