"""The vocabulary every evaluation module shares: the record files, their keys, and reading them back.

A *cell* is one sample under one protocol (task, length, protocol, sample index); its record is one JSON line of
``cells.jsonl`` holding the full-cache reference and one *row* per (method label, budget). ``grid.json`` holds the
grid the folder's records were run with.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kvpress_like.budget import Budget

CELLS_FILE = "cells.jsonl"
GRID_FILE = "grid.json"
FULL = "full"  # the label of the full-cache reference
NO_BUDGET = "100%"  # the budget recorded for a method that keeps every token and takes no budget
ALL = "all"  # the length of a table row that pools every length


def budget_key(budget: int | float | str) -> tuple[int, float]:
    """Sort key: ratios first by value, then token counts."""
    parsed = Budget.model_validate(budget)
    return (0, parsed.ratio) if parsed.ratio is not None else (1, float(parsed.tokens))


def budget_value(budget: str) -> int | float | str:
    """A budget as a record writes it ("10%", "256", "0.1") as :func:`kvpress_like.factory.build` takes it."""
    text = budget.strip()
    if text.endswith("%"):
        return text
    try:
        return int(text)
    except ValueError:
        return float(text)


def cell_key(task: str, length: int, protocol: str, index: int) -> str:
    return f"{task}|{length}|{protocol}|{index}"


def read_cells(path: Path) -> list[dict[str, Any]]:
    """The records of a ``cells.jsonl`` (none if it does not exist); a line cut by an interruption is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by an interruption: that cell simply runs again
    return records


def done_pairs(records: Iterable[dict[str, Any]]) -> dict[str, set[tuple[str, str]]]:
    """Per cell, the (label, budget) pairs its records hold (the full-cache reference always)."""
    done: dict[str, set[tuple[str, str]]] = {}
    for record in records:
        pairs = done.setdefault(record["cell"], set())
        pairs.update((row["label"], str(row["budget"])) for row in record["rows"])
        pairs.add((FULL, NO_BUDGET))
    return done


def merge_cells(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One entry per cell: its first reference, and per (label, budget) the last row written.

    A record's follow-up questions become cells of their own, ``<cell>|q<number>``, with a ``question``.
    """
    cells: dict[str, dict[str, Any]] = {}
    for record in _questions(records):
        cell = cells.setdefault(record["cell"], {**{k: v for k, v in record.items() if k != "rows"}, "rows": {}})
        for row in record["rows"]:
            cell["rows"][(row["label"], str(row["budget"]))] = row
    return cells


def _questions(records: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Each record, then one record per follow-up question (same context, same compressed caches)."""
    for record in records:
        base = {k: v for k, v in record.items() if k != "followups"}
        yield base
        for followup in record.get("followups", []):
            yield {**base, **followup, "cell": f"{record['cell']}|q{followup['question']}"}


class CellsFile:
    """``cells.jsonl`` opened for appending: one flushed line per record, so an interruption loses at most one."""

    def __init__(self, out: Path):
        self.path = out / CELLS_FILE

    def __enter__(self) -> CellsFile:
        cut = self.path.is_file() and self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n")
        self._handle = self.path.open("a")
        if cut:
            self._handle.write("\n")  # the previous run was cut mid-line: start the next record on its own line
        return self

    def append(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def __exit__(self, *exc) -> None:
        self._handle.close()
