"""The core never imports the evaluation harness: only the command line dispatches to it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = "kvpress_like.eval"
DISPATCHERS = {ROOT / "kvpress_like" / "cli.py"}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def core_modules() -> list[Path]:
    folders = [ROOT / "kvpress_like", ROOT / "methods", ROOT / "scorers"]
    return sorted(path for folder in folders for path in folder.glob("*.py") if path not in DISPATCHERS)


def test_core_modules_do_not_import_the_harness():
    offenders = {
        str(path.relative_to(ROOT)): sorted(name for name in imported_modules(path) if name.startswith(HARNESS))
        for path in core_modules()
    }
    assert len(offenders) > 40  # the glob found the core
    assert not {path: names for path, names in offenders.items() if names}


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "lazy.py"
    module.write_text("def demo():\n    from kvpress_like.eval.tasks import single_needle\n")
    assert "kvpress_like.eval.tasks" in imported_modules(module)
