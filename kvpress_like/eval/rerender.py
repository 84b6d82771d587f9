"""Re-render a results folder's document from its records alone (no model, no cell is run).

    python -m kvpress_like.eval.rerender docs/results/ablation docs/results/probe [--write]

An ablation folder's ``summary.md`` comes from its ``grid.json`` and ``cells.jsonl``, a probe folder's ``probe.md``
from its ``probe.json``; the command line (and the probe's model name) come from the committed document. Tests
check that every published document equals its re-rendering, and that the results pages' tables equal the tables
of these documents (:mod:`kvpress_like.eval.pages`).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

from kvpress_like.eval.grid import parse_grid
from kvpress_like.eval.records import CELLS_FILE, GRID_FILE, merge_cells, read_cells
from kvpress_like.eval.summary import aggregate, markdown

PROBE_FILE = "probe.json"
# records of the benchmark commands -> their document (probe, ``kvpress-like bench``, the two bench scripts)
DOCUMENTS = {PROBE_FILE: "probe.md", "bench.json": "bench.md", "long_prompt.json": "long_prompt.md",
             "bench_batch.json": "bench_batch.md"}


def document(folder: Path) -> Path:
    """The Markdown document of a results folder: that of its benchmark record (:data:`DOCUMENTS`), else
    ``summary.md`` (an ablation)."""
    for record, name in DOCUMENTS.items():
        if (folder / record).is_file():
            return folder / name
    return folder / "summary.md"


def render_folder(folder: Path, anchor: str | None = None) -> str:
    """The document that ``folder``'s records render to (``anchor``: the method of the paired tables, in every
    block; see :func:`kvpress_like.eval.summary.markdown`)."""
    from kvpress_like.eval.bench import batch_markdown, bench_markdown, long_prompt_markdown
    from kvpress_like.eval.probe import probe_markdown

    path = document(folder)
    if path.name != "summary.md":
        record = json.loads((folder / next(r for r, name in DOCUMENTS.items() if name == path.name)).read_text())
        if path.name in ("probe.md", "bench.md"):  # their title names the model
            model = re.match(r"# .* on (\S+)\n", path.read_text()).group(1)
            render = probe_markdown if path.name == "probe.md" else bench_markdown
            return render(record, model, _command(folder))
        render = long_prompt_markdown if path.name == "long_prompt.md" else batch_markdown
        return render(record, _command(folder))
    grid = parse_grid(json.loads((folder / GRID_FILE).read_text())["grid"], str(folder / GRID_FILE))
    records = read_cells(folder / CELLS_FILE)
    table, b95 = aggregate(records, [entry.name for entry in grid.method_entries()], list(grid.protocols))
    timing = {
        "cells": len({record["cell"] for record in records}),
        "questions": len(merge_cells(records)),
        "cell_seconds_total": round(sum(r["seconds"] for r in records), 1),
        "cell_seconds_mean": round(sum(r["seconds"] for r in records) / len(records), 2) if records else None,
    }
    return markdown(grid, table, b95, timing, _command(folder), records, anchor)


def _command(folder: Path) -> str | None:
    path = document(folder)
    found = re.search(r"^```bash\n(.*?)\n```", path.read_text(), flags=re.M | re.S) if path.is_file() else None
    return found.group(1) if found else None


def command_line(description: str, render: Callable[[Path], str], target: Callable[[Path], Path] = lambda path: path,
                 note: Callable[[str], str] = lambda text: "", argv: list[str] | None = None) -> None:
    """``PATH ... [--write]``: say whether each path's file (``target``) equals ``render(path)``, or rewrite it."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--write", action="store_true", help="rewrite what is stale (else say what is)")
    args = parser.parse_args(argv)
    for path in args.paths:
        text, out = render(path), target(path)
        stale = text != out.read_text()
        if args.write and stale:
            out.write_text(text)
        print(f"{path}: " + (("written" if args.write else "stale") if stale else "up to date") + note(text))


def main(argv: list[str] | None = None) -> None:
    command_line(__doc__, render_folder, document, argv=argv)


if __name__ == "__main__":
    main()
