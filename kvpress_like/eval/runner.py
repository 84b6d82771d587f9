"""Run (or resume) an ablation grid (:mod:`.grid`) into a folder of records (:mod:`.records`).

Every finished cell (:mod:`.records`) is appended as one JSON line to ``cells.jsonl`` in the output folder, so
an interrupted run resumes where it stopped: cells whose (method, budget) pairs are all present are skipped, and a
cell only runs the pairs it lacks (e.g. after a method was added to the grid). Each (method, budget) pipeline is
built once per run (:func:`candidates`). The runner only runs: the command line and the Ray driver write the
summary afterwards (:func:`kvpress_like.eval.summary.write_summary`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from kvpress_like.errors import ConfigError
from kvpress_like.eval.engine import Candidate, evaluate_batch
from kvpress_like.eval.grid import GridConfig, MethodEntry, candidate, grid_samples
from kvpress_like.eval.records import CELLS_FILE, GRID_FILE, CellsFile, cell_key, done_pairs, read_cells
from kvpress_like.eval.tasks import Sample
from kvpress_like.provenance import provenance

Built = dict[tuple[str, str], Candidate]  # (label, budget) -> its candidate, built once per run


class Unit(NamedTuple):
    """One prefill's worth of work: a sample under one protocol and the (method, budget) pairs it lacks."""

    key: str
    task: str
    length: int
    protocol: str
    index: int
    sample: Sample
    missing: list[tuple[MethodEntry, str]]


class Run(NamedTuple):
    """What one call of :func:`run_grid` did: its folder, how many cells it ran, and in how many seconds."""

    out: Path
    cells_run: int
    seconds: float


def candidates(pairs: list[tuple[MethodEntry, str]]) -> Built:
    """The candidate of every (method entry, budget), keyed by (label, budget); fails fast on unknown methods or
    options, naming the valid ones."""
    built = {}
    for entry, budget in pairs:
        if (entry.name, budget) not in built:
            built[(entry.name, budget)] = candidate(entry, budget)
    return built


def open_output(grid: GridConfig, out_dir: str | Path) -> Path:
    """Create ``out_dir`` and record the grid there; refuses a folder holding another grid's results."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_identity(grid, out)
    return out


def pending_units(grid: GridConfig, out: Path, tokenizer, limit: int | None = None,
                  built: Built | None = None) -> list[Unit]:
    """The units ``cells.jsonl`` in ``out`` still lacks (at most ``limit``); fails fast on bad methods, and
    on recorded cells whose (label, budget) now resolves to another pipeline configuration. ``built``: the
    grid's :func:`candidates`, if the caller has them."""
    planned = grid.planned_pairs()
    built = candidates(planned) if built is None else built
    configs = {key: _as_recorded(c.pipeline.config) for key, c in built.items()}
    records = read_cells(out / CELLS_FILE)
    _check_recorded_configs(records, configs, out)
    done = done_pairs(records)
    todo = []
    for task, length, index, sample in grid_samples(grid, tokenizer):
        for protocol in grid.protocols:
            key = cell_key(task, length, protocol, index)
            missing = [(e, b) for e, b in planned if (e.name, b) not in done.get(key, set())]
            if key not in done or missing:
                todo.append(Unit(key, task, length, protocol, index, sample, missing))
    return todo if limit is None else todo[:limit]


def _check_recorded_configs(records: list[dict[str, Any]], configs: dict[tuple[str, str], dict], out: Path) -> None:
    """Refuse to resume when a recorded (label, budget) was computed with another configuration than it has now."""
    for record in records:
        for row in record["rows"]:
            now = configs.get((row["label"], str(row["budget"])))
            if now is not None and row.get("config") is not None and row["config"] != now:
                raise ConfigError(
                    f"{out / CELLS_FILE} holds {row['label']!r} at {row['budget']} computed with {row['config']}, "
                    f"but it now resolves to {now} (the method or its defaults changed); resuming would mix two "
                    "methods under one label: use another output folder, or give this one another label"
                )


def _as_recorded(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` as a record holds it once written and read back (JSON: tuples become lists)."""
    return json.loads(json.dumps(config))


def _with_configs(rows: list[dict[str, Any]], configs: dict[tuple[str, str], dict]) -> list[dict[str, Any]]:
    return [{**row, "config": configs.get((row["label"], str(row["budget"])))} for row in rows]


def unit_batches(units: list[Unit], size: int) -> list[list[Unit]]:
    """``units`` in batches of at most ``size`` that can share a prompt forward (same protocol and same
    missing (method, budget) pairs), in their order of first appearance."""
    groups: dict[tuple, list[Unit]] = {}
    for unit in units:
        key = (unit.protocol, tuple((entry.name, budget) for entry, budget in unit.missing))
        groups.setdefault(key, []).append(unit)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


def run_units(model, tokenizer, grid: GridConfig, units: list[Unit], built: Built | None = None
              ) -> list[dict[str, Any]]:
    """Evaluate a batch of units (see :func:`unit_batches`); returns their ``cells.jsonl`` records, in order
    (a sample's follow-up questions in ``followups``). ``built``: candidates built before (:func:`candidates`);
    the pairs it lacks are built here.

    Every row carries the resolved configuration of its pipeline, the record the package version and commit.
    """
    pairs = units[0].missing
    built = built or {}
    chosen = [built.get((entry.name, budget)) or candidate(entry, budget) for entry, budget in pairs]
    configs = {(c.label, str(c.budget)): c.pipeline.config for c in chosen}
    results = evaluate_batch(
        model, tokenizer, [unit.sample for unit in units], units[0].protocol, chosen,
        answer_prefix=grid.answer_prefix, max_new_tokens=grid.max_new_tokens,
        attention_metrics=grid.attention_metrics, batch=grid.batch, prompt_chunk=grid.prompt_chunk,
        interim_factor=grid.interim_factor,
    )
    return [_record(unit, result, configs) for unit, result in zip(units, results, strict=True)]


def run_unit(model, tokenizer, grid: GridConfig, unit: Unit) -> dict[str, Any]:
    """Evaluate one unit alone; returns its ``cells.jsonl`` record."""
    return run_units(model, tokenizer, grid, [unit])[0]


def _record(unit: Unit, result, configs: dict[tuple[str, str], dict]) -> dict[str, Any]:
    record = {
        "cell": unit.key, "task": unit.task, "length": unit.length, "protocol": unit.protocol, "index": unit.index,
        "depth": unit.sample.meta.get("depth"), "seed": unit.sample.meta.get("seed"),
        "reference": result.reference, "seconds": round(result.seconds, 3), "provenance": provenance(),
        "rows": _with_configs(result.rows, configs),
    }
    if result.followups:  # more questions about the same context: one entry each, numbered from 1
        record["question"] = 0
        record["followups"] = [
            {"question": number, "reference": f.reference, "rows": _with_configs(f.rows, configs)}
            for number, f in enumerate(result.followups, start=1)
        ]
    return record


def run_grid(
    grid: GridConfig,
    out_dir: str | Path,
    model=None,
    tokenizer=None,
    progress: bool = True,
    limit: int | None = None,
) -> Run:
    """Run (or resume) ``grid`` into ``out_dir``: every cell ``cells.jsonl`` lacks (at most ``limit``)."""
    out = open_output(grid, out_dir)
    if grid.threads:
        torch.set_num_threads(grid.threads)
    if model is None:
        from kvpress_like.models import load_model  # loads transformers' model classes: only when needed

        model, tokenizer = load_model(grid.model, dtype=getattr(torch, grid.dtype))
    built = candidates(grid.planned_pairs())
    todo = pending_units(grid, out, tokenizer, limit, built)
    bar = progress_bar(len(todo), grid.name, progress)
    started = time.perf_counter()
    with CellsFile(out) as cells:
        for batch in unit_batches(todo, grid.batch_size):
            for unit, record in zip(batch, run_units(model, tokenizer, grid, batch, built), strict=True):
                cells.append(record)
                bar.update(1)
                bar.set_postfix_str(f"{unit.key} {record['seconds']:.1f}s")
    bar.close()
    return Run(out, len(todo), time.perf_counter() - started)


def _check_identity(grid: GridConfig, out: Path) -> None:
    path = out / GRID_FILE
    identity = grid.identity()
    if path.is_file():
        previous = json.loads(path.read_text()).get("identity", {})
        # A setting added after the run was recorded had its default then.
        defaults = {k: type(grid).model_fields[k].default for k in identity}
        changed = {k: (previous.get(k, defaults[k]), v) for k, v in identity.items()
                   if previous.get(k, defaults[k]) != v}
        if changed and (out / CELLS_FILE).is_file():
            raise ConfigError(
                f"{out} holds results of a grid with other settings {changed}; use another output folder "
                "or delete it"
            )
    path.write_text(json.dumps({"identity": identity, "grid": grid.model_dump(mode="json")}, indent=2))


class _NoBar:
    def update(self, n: int) -> None: ...

    def set_postfix_str(self, text: str) -> None: ...

    def close(self) -> None: ...


def progress_bar(total: int, name: str, enabled: bool):
    """A tqdm bar of ``total`` steps, or one that shows nothing (``enabled`` false, or tqdm not installed)."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the eval extra; without it the run is silent
        return _NoBar()
    return tqdm(total=total, desc=name, unit="cell", dynamic_ncols=True)
