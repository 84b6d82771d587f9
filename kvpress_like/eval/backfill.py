"""Backfill the resolved configuration into records made before runs recorded it, checked by re-running cells.

    python -m kvpress_like.eval.backfill docs/results/ablation [--cells KEY ...] [--write]

Records written before ``cells.jsonl`` carried each row's pipeline configuration (see
:func:`kvpress_like.eval.runner.run_unit`) name only a label and a budget. This command resolves every row's
(label, budget) from the folder's own ``grid.json`` with the current code, then checks that the current code
still computes those rows: it re-runs the records of a few cells (by default, per protocol, the cheapest recorded
cell; every record of it, with the (label, budget) pairs that record held, so each run's batch is rebuilt as it was) and
compares, row by row, the answer, its correctness, the kept budget tokens and the exception of a row that could
not run (not its wording), and the full-cache reference's answer. ``--check`` takes a check printed before, so the
re-run can happen in a clean checkout of one commit (the check names it) and the writing elsewhere.

With ``--write`` every record without provenance gets one that says what happened, e.g.::

    "provenance": {"version": null, "commit": null, "config": "backfilled from grid.json",
                   "backfill": {"version": "0.1.0", "commit": "<the commit that resolved the configurations>",
                                "first_committed": "<the commit that added these records>"},
                   "check": {"rerun_by": {"version": ..., "commit": ...}, "cells": [...], "rows_compared": ...,
                             "reproduced": [...], "differ": [...], "examples": [...]}}

and its rows get ``config``: the resolved configuration for labels whose re-run rows all equal the recorded
ones, ``null`` for labels that differ (or were not re-run, or are not in ``grid.json``), so nobody reads an
unverified configuration as the one a row was computed with. The run's own version and commit stay unknown
(``null``). The folder's ``summary.md`` is then re-rendered; it says how the configuration was obtained.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kvpress_like.errors import ConfigError
from kvpress_like.eval.grid import GridConfig, candidate, grid_samples, parse_grid
from kvpress_like.eval.records import CELLS_FILE, FULL, GRID_FILE, read_cells
from kvpress_like.eval.runner import Unit, run_unit
from kvpress_like.provenance import provenance

BACKFILLED = "backfilled from grid.json"
COMPARED = ("answer", "correct", "budget_tokens")


def load_folder(folder: Path) -> tuple[GridConfig, list[dict[str, Any]]]:
    grid = parse_grid(json.loads((folder / GRID_FILE).read_text())["grid"], str(folder / GRID_FILE))
    return grid, read_cells(folder / CELLS_FILE)


def cheapest_cells(records: list[dict[str, Any]]) -> list[str]:
    """Per protocol, the cell whose records took the least time in all (every record of a cell is re-run)."""
    seconds: dict[tuple[str, str], float] = {}
    for record in records:
        key = (record["protocol"], record["cell"])
        seconds[key] = seconds.get(key, 0.0) + record["seconds"]
    best: dict[str, str] = {}
    for protocol, cell in sorted(seconds, key=seconds.__getitem__):
        best.setdefault(protocol, cell)
    return list(best.values())


def rerun(grid: GridConfig, records: list[dict[str, Any]], cells: Iterable[str], model=None, tokenizer=None):
    """``(recorded, re-run)`` for every record of ``cells``, each re-run with that record's (label, budget) pairs."""
    import torch

    if model is None:
        from kvpress_like.models import load_model

        model, tokenizer = load_model(grid.model, dtype=getattr(torch, grid.dtype))
    if grid.threads:
        torch.set_num_threads(grid.threads)
    entries = {entry.name: entry for entry in grid.method_entries()}
    wanted = [r for r in records if r["cell"] in set(cells)]
    samples = {(task, length, index): sample for task, length, index, sample in grid_samples(grid, tokenizer)}
    pairs = []
    for record in wanted:
        missing = [(entries[row["label"]], str(row["budget"])) for row in record["rows"] if row["label"] in entries]
        sample = samples[(record["task"], record["length"], record["index"])]
        unit = Unit(record["cell"], record["task"], record["length"], record["protocol"], record["index"], sample,
                    missing)
        pairs.append((record, run_unit(model, tokenizer, grid, unit)))
    return pairs


def _questions(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [record, *record.get("followups", [])]


def compare(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Which labels' re-run rows equal the recorded ones (answer, correctness, kept budget tokens, error)."""
    same: set[str] = set()
    differ: set[str] = set()
    examples = []
    compared = 0
    for recorded, again in pairs:
        for asked, got in zip(_questions(recorded), _questions(again), strict=True):
            if {k: asked["reference"].get(k) for k in ("answer", "correct")} != {
                k: got["reference"].get(k) for k in ("answer", "correct")
            }:
                differ.add(FULL)
                examples.append({"cell": recorded["cell"], "label": FULL, "recorded": asked["reference"]["answer"],
                                 "rerun": got["reference"]["answer"]})
            rows = {(row["label"], str(row["budget"])): row for row in got["rows"]}
            for row in asked["rows"]:
                new = rows.get((row["label"], str(row["budget"])))
                if new is None:
                    continue
                compared += 1
                fields = [k for k in COMPARED if row.get(k) != new.get(k)]
                if _error_kind(row) != _error_kind(new):  # the exception, not its wording
                    fields.append("error")
                (differ if fields else same).add(row["label"])
                if fields and len(examples) < 8:
                    examples.append({"cell": recorded["cell"], "label": row["label"], "budget": row["budget"],
                                     **{f"{k}": [row.get(k), new.get(k)] for k in fields}})
    return {
        "rerun_by": provenance(),
        "cells": sorted({recorded["cell"] for recorded, _ in pairs}),
        "rows_compared": compared,
        "reproduced": sorted(same - differ),
        "differ": sorted(differ),
        "examples": examples,
    }


def _error_kind(row: dict[str, Any]) -> str | None:
    return row["error"].split(":")[0] if row.get("error") else None


def backfill(grid: GridConfig, records: list[dict[str, Any]], check: dict[str, Any],
             first_committed: str | None = None) -> list[dict[str, Any]]:
    """``records`` with configuration and provenance filled in (records that already have provenance are kept)."""
    entries = {entry.name: entry for entry in grid.method_entries()}
    trusted = set(check["reproduced"]) if FULL not in check["differ"] else set()
    configs: dict[tuple[str, str], dict | None] = {}

    def config(row: dict[str, Any]) -> dict | None:
        key = (row["label"], str(row["budget"]))
        if key not in configs:
            entry = entries.get(row["label"])
            try:
                found = candidate(entry, key[1]) if row["label"] in trusted else None
                # a method that takes no budget recorded at one: the row recorded an error, no pipeline ran
                configs[key] = found.pipeline.config if found is not None and found.budget == key[1] else None
            except ConfigError:  # a budget this method refuses: the row recorded an error, no pipeline ran
                configs[key] = None
        return configs[key]

    stamp = {
        "version": None, "commit": None, "config": BACKFILLED,
        "backfill": {**provenance(), "first_committed": first_committed}, "check": check,
    }
    out = []
    for record in records:
        if record.get("provenance"):
            out.append(record)
            continue
        filled = {**record, "provenance": stamp, "rows": [{**row, "config": config(row)} for row in record["rows"]]}
        if "followups" in record:
            filled["followups"] = [{**f, "rows": [{**row, "config": config(row)} for row in f["rows"]]}
                                   for f in record["followups"]]
        out.append(filled)
    return out


def first_commit(path: Path) -> str | None:
    """The commit that added ``path`` (None outside a git checkout)."""
    try:
        found = subprocess.run(["git", "-C", str(path.parent), "log", "--diff-filter=A", "--format=%H", "--",
                                path.name], capture_output=True, text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--cells", nargs="+", help="cell keys to re-run (default: per protocol, the cheapest cell)")
    parser.add_argument("--check", type=Path, help="a check this command printed before (JSON), instead of re-running")
    parser.add_argument("--write", action="store_true", help="write cells.jsonl and re-render summary.md")
    args = parser.parse_args(argv)
    grid, records = load_folder(args.folder)
    if args.check:
        check = {k: v for k, v in json.loads(args.check.read_text()).items() if k != "folder"}
    else:
        check = compare(rerun(grid, records, args.cells or cheapest_cells(records)))
        print(json.dumps({"folder": str(args.folder), **check}, indent=1))
    if args.write:
        from kvpress_like.eval.rerender import render_folder

        filled = backfill(grid, records, check, first_commit(args.folder / CELLS_FILE))
        (args.folder / CELLS_FILE).write_text("".join(json.dumps(record) + "\n" for record in filled))
        (args.folder / "summary.md").write_text(render_folder(args.folder))


if __name__ == "__main__":
    main()
