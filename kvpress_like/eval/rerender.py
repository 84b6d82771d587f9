"""Re-render a results folder's ``summary.md`` from its records alone (no model, no cell is run).

    python -m kvpress_like.eval.rerender docs/results/ablation [--write]

The grid comes from the folder's ``grid.json``, the records from ``cells.jsonl`` and the command line from
the committed ``summary.md``; tests check that every published summary equals its re-rendering.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from kvpress_like.eval.report import aggregate, markdown, merge_cells
from kvpress_like.eval.runner import CELLS_FILE, GRID_FILE, parse_grid, read_cells


def render_folder(folder: Path) -> str:
    """The ``summary.md`` that ``folder``'s records render to."""
    grid = parse_grid(json.loads((folder / GRID_FILE).read_text())["grid"], str(folder / GRID_FILE))
    records = read_cells(folder / CELLS_FILE)
    table, b95 = aggregate(records, [entry.name for entry in grid.method_entries()], list(grid.protocols))
    timing = {
        "cells": len({record["cell"] for record in records}),
        "questions": len(merge_cells(records)),
        "cell_seconds_total": round(sum(r["seconds"] for r in records), 1),
        "cell_seconds_mean": round(sum(r["seconds"] for r in records) / len(records), 2) if records else None,
    }
    return markdown(grid, table, b95, timing, _command(folder), records)


def _command(folder: Path) -> str | None:
    summary = folder / "summary.md"
    found = re.search(r"^```bash\n(.*?)\n```", summary.read_text(), flags=re.M | re.S) if summary.is_file() else None
    return found.group(1) if found else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--write", action="store_true", help="overwrite summary.md (else print what differs)")
    args = parser.parse_args(argv)
    for folder in args.folders:
        text = render_folder(folder)
        if args.write:
            (folder / "summary.md").write_text(text)
        state = "up to date" if text == (folder / "summary.md").read_text() else "stale"
        print(f"{folder}: {'written' if args.write else state}")


if __name__ == "__main__":
    main()
