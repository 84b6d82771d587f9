"""Resumable ablation grids: methods × window builders × budgets × lengths × tasks × protocols.

A *cell* is one sample under one protocol (task, length, protocol, sample index): its prompt is
prefilled once and every (method, budget) of the grid is evaluated on it (see :mod:`.engine`). Each
finished cell is appended as one JSON line to ``cells.jsonl`` in the output folder, so an interrupted
run resumes where it stopped: cells whose (method, budget) pairs are all present are skipped, and a
cell only runs the pairs it lacks (e.g. after a method was added to the grid). The summary (JSON, CSV,
Markdown) and the plots are rebuilt from ``cells.jsonl`` at the end.

A grid is a YAML file::

    name: needles-1k-2k
    model: smollm2-135m
    tasks: [single_needle]            # or [{name: multi_key, options: {n_keys: 4}}]
    lengths: [1024, 2048]
    samples: 20                       # per task and length; depths cycle through `depths`
    protocols: [question_aware, query_agnostic]
    budgets: ["3%", "5%", "10%"]
    methods:
      - full                          # the full-cache reference (always computed)
      - dapq
      - {label: dapq_avgpool7, method: dapq, scorer: {pooling: avg, kernel: 7}}
      - {label: semantic, method: dapq, window: semantic}
    windows: [null, suffix]           # optional: every method again with each window builder
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvpress_like.budget import Budget
from kvpress_like.errors import ConfigError
from kvpress_like.eval.engine import Candidate, evaluate_batch
from kvpress_like.eval.protocols import PROTOCOLS
from kvpress_like.eval.tasks import DEFAULT_DEPTHS, Sample, load_jsonl, make_samples, task_spec
from kvpress_like.methods_spec import PART_KINDS

CELLS_FILE = "cells.jsonl"
GRID_FILE = "grid.json"
FULL = "full"
SettingsT = TypeVar("SettingsT", bound=BaseModel)


class MethodEntry(BaseModel):
    """One method configuration of a grid: a registered method plus optional part overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    label: str | None = None
    window: Any = None
    scorer: Any = None
    allocator: Any = None
    selector: Any = None

    @property
    def overrides(self) -> dict[str, Any]:
        return {kind: getattr(self, kind) for kind in PART_KINDS if getattr(self, kind) is not None}

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        extra = ",".join(f"{k}={_short(v)}" for k, v in self.overrides.items())
        return f"{self.method}[{extra}]" if extra else self.method

    @property
    def is_full(self) -> bool:
        return self.method == FULL and not self.overrides


class TaskEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class GridConfig(BaseModel):
    """A grid; see the module docstring. ``methods: all`` means every registered method at its defaults."""

    model_config = ConfigDict(extra="forbid")

    name: str = "ablation"
    model: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16"] = "float32"
    tasks: list[TaskEntry] = Field(default_factory=lambda: [TaskEntry(name="single_needle")])
    data: str | None = Field(None, description="JSONL of samples to use instead of generated tasks")
    lengths: list[int] = Field(default_factory=lambda: [1024])
    depths: list[float] = Field(default_factory=lambda: list(DEFAULT_DEPTHS))
    samples: int = Field(10, ge=1)
    seed: int = 0
    protocols: list[Literal["question_aware", "query_agnostic"]] = Field(default_factory=lambda: list(PROTOCOLS))
    budgets: list[int | float | str] = Field(default_factory=lambda: ["10%"])
    methods: list[MethodEntry] = Field(default_factory=lambda: [MethodEntry(method="dapq")])
    windows: list[Any] | None = None
    max_new_tokens: int | None = None
    answer_prefix: bool = True
    attention_metrics: bool = True
    batch: bool = True
    batch_size: int = Field(1, ge=1, description="samples whose prompts share one (left-padded) prompt forward")
    prompt_chunk: int | None = Field(None, ge=1, description="progressive prefill of every method, in prompt chunks "
                                     "of this many tokens (kvpress_like.progressive)")
    interim_factor: float = Field(1.0, ge=1, description="with prompt_chunk: each layer's budget × this is kept "
                                  "between chunks")
    threads: int | None = None

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks(cls, value):
        return [{"name": v} if isinstance(v, str) else v for v in value]

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, value):
        if value == "all":
            from kvpress_like.plugins import get_registry

            return [{"method": FULL}] + [{"method": m} for m in sorted(get_registry().methods) if m != FULL]
        return [{"method": v} if isinstance(v, str) else v for v in value]

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, value):
        for budget in value:
            try:
                Budget.model_validate(budget)
            except ValidationError as error:
                raise ValueError(f"invalid budget {budget!r}: {error.errors()[0]['msg']}") from None
        return value

    @model_validator(mode="after")
    def _interim_needs_chunks(self):
        if self.interim_factor != 1.0 and self.prompt_chunk is None:
            raise ValueError("interim_factor applies to progressive prefills: set prompt_chunk too")
        return self

    def method_entries(self) -> list[MethodEntry]:
        """Methods, multiplied by ``windows`` when given (``null`` keeps the method's own window)."""
        if not self.windows:
            return list(self.methods)
        out = []
        for entry in self.methods:
            if entry.is_full:
                out.append(entry)
                continue
            for window in self.windows:
                if window is None:
                    out.append(entry)
                else:
                    label = f"{entry.name}+window={_short(window)}"
                    out.append(entry.model_copy(update={"window": window, "label": label}))
        return out

    def identity(self) -> dict[str, Any]:
        """What must not change between a run and its resumption."""
        return {k: getattr(self, k) for k in ("model", "dtype", "answer_prefix", "max_new_tokens", "data",
                                              "prompt_chunk", "interim_factor")}


def load_grid(path: str | Path, **overrides: Any) -> GridConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a grid is a mapping of settings")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return parse_grid(raw, str(path))


def parse_grid(raw: dict[str, Any], source: str = "grid") -> GridConfig:
    return parse_settings(GridConfig, raw, source)


def parse_settings(model: type[SettingsT], raw: dict[str, Any], source: str) -> SettingsT:
    """Validate ``raw`` as ``model``; a :class:`ConfigError` names each bad setting and the valid ones."""
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors())
        valid = ", ".join(model.model_fields)
        raise ConfigError(f"{source}: {problems} (valid settings: {valid})") from None


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{v}" for k, v in value.items()) + "}"
    return str(value)


def budget_key(budget: int | float | str) -> tuple[int, float]:
    """Sort key: ratios first by value, then token counts."""
    parsed = Budget.model_validate(budget)
    return (0, parsed.ratio) if parsed.ratio is not None else (1, float(parsed.tokens))


# ------------------------------------------------------------------------------------------------
# Cells
# ------------------------------------------------------------------------------------------------


def cell_key(task: str, length: int, protocol: str, index: int) -> str:
    return f"{task}|{length}|{protocol}|{index}"


def grid_samples(grid: GridConfig, tokenizer) -> list[tuple[str, int, int, Sample]]:
    """``(task, length, index, sample)`` for every sample of the grid."""
    if grid.data:
        samples = load_jsonl(grid.data)
        return [(s.task, int(s.meta.get("context_tokens", 0)), i, s) for i, s in enumerate(samples)]
    out = []
    for task in grid.tasks:
        task_spec(task.name)
        for length in grid.lengths:
            made = make_samples(tokenizer, task.name, length, grid.samples, grid.seed, grid.depths, **task.options)
            out += [(task.name, length, i, s) for i, s in enumerate(made)]
    return out


def read_cells(path: Path) -> list[dict[str, Any]]:
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
    done: dict[str, set[tuple[str, str]]] = {}
    for record in records:
        pairs = done.setdefault(record["cell"], set())
        pairs.update((row["label"], str(row["budget"])) for row in record["rows"])
        pairs.add((FULL, "100%"))
    return done


def planned_pairs(grid: GridConfig) -> list[tuple[MethodEntry, str]]:
    """Every (method entry, budget) to evaluate; a method that takes no budget is evaluated once, at "100%"."""
    pairs = []
    for entry in grid.method_entries():
        if entry.is_full:
            continue
        budgets = [NO_BUDGET] if takes_no_budget(entry) else [str(b) for b in grid.budgets]
        pairs += [(entry, budget) for budget in budgets]
    return pairs


NO_BUDGET = "100%"


def takes_no_budget(entry: MethodEntry) -> bool:
    """True for methods that keep every token and refuse a budget (e.g. ``full`` with part overrides)."""
    from kvpress_like.factory import build

    try:
        build(entry.method, budget="50%", **entry.overrides)
    except ConfigError:
        try:
            build(entry.method, **entry.overrides)
        except ConfigError:
            return False
        return True
    return False


def build_at_budget(method: str, budget: str):
    """The registered ``method`` at ``budget`` (text: "10%", "256", "0.1"); a method that keeps every token and
    refuses a budget (``full``) is built without it."""
    from kvpress_like.factory import build

    if takes_no_budget(MethodEntry(method=method)):
        return build(method)
    return build(method, budget=_budget_value(budget))


def build_candidate(entry: MethodEntry, budget: str) -> Candidate:
    from kvpress_like.factory import build

    if budget == NO_BUDGET and takes_no_budget(entry):
        return Candidate(entry.name, budget, build(entry.method, **entry.overrides))
    return Candidate(entry.name, budget, build(entry.method, budget=_budget_value(budget), **entry.overrides))


def _budget_value(budget: str) -> int | float | str:
    text = budget.strip()
    if text.endswith("%"):
        return text
    try:
        return int(text)
    except ValueError:
        return float(text)


class Unit(NamedTuple):
    """One prefill's worth of work: a sample under one protocol and the (method, budget) pairs it lacks."""

    key: str
    task: str
    length: int
    protocol: str
    index: int
    sample: Sample
    missing: list[tuple[MethodEntry, str]]


def open_output(grid: GridConfig, out_dir: str | Path) -> Path:
    """Create ``out_dir`` and record the grid there; refuses a folder holding another grid's results."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_identity(grid, out)
    return out


def pending_units(grid: GridConfig, out: Path, tokenizer, limit: int | None = None) -> list[Unit]:
    """The units ``cells.jsonl`` in ``out`` still lacks (at most ``limit``); fails fast on bad methods, and
    on recorded cells whose (label, budget) now resolves to another pipeline configuration."""
    planned = planned_pairs(grid)  # fails fast on unknown methods or options, naming the valid ones
    configs = {(entry.name, budget): _as_recorded(build_candidate(entry, budget).pipeline.config)
               for entry, budget in planned}
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


@functools.cache
def provenance() -> dict[str, str | None]:
    """The package version and, in a git checkout, the commit the code was run from (``+dirty`` if modified)."""
    import subprocess

    from kvpress_like import __version__

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"version": __version__, "commit": None}
    return {"version": __version__, "commit": commit + ("+dirty" if dirty else "")}


def unit_batches(units: list[Unit], size: int) -> list[list[Unit]]:
    """``units`` in batches of at most ``size`` that can share a prompt forward (same protocol and same
    missing (method, budget) pairs), in their order of first appearance."""
    groups: dict[tuple, list[Unit]] = {}
    for unit in units:
        key = (unit.protocol, tuple((entry.name, budget) for entry, budget in unit.missing))
        groups.setdefault(key, []).append(unit)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


def run_units(model, tokenizer, grid: GridConfig, units: list[Unit]) -> list[dict[str, Any]]:
    """Evaluate a batch of units (see :func:`unit_batches`); returns their ``cells.jsonl`` records, in order
    (a sample's follow-up questions in ``followups``).

    Every row carries the resolved configuration of its pipeline, the record the package version and commit.
    """
    candidates = [build_candidate(entry, budget) for entry, budget in units[0].missing]
    configs = {(c.label, str(c.budget)): c.pipeline.config for c in candidates}
    results = evaluate_batch(
        model, tokenizer, [unit.sample for unit in units], units[0].protocol, candidates,
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


def finish_run(grid: GridConfig, out: Path, started: float, cells_run: int, command: str | None) -> dict[str, Any]:
    """Write the summary files from every record in ``out``; returns the summary."""
    from kvpress_like.eval.report import write_summary

    return write_summary(grid, read_cells(out / CELLS_FILE), out, run_seconds=time.perf_counter() - started,
                         cells_run=cells_run, command=command)


def run_grid(
    grid: GridConfig,
    out_dir: str | Path,
    model=None,
    tokenizer=None,
    progress: bool = True,
    limit: int | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``grid`` into ``out_dir`` and write the summary files; returns the summary."""
    out = open_output(grid, out_dir)
    if grid.threads:
        torch.set_num_threads(grid.threads)
    if model is None:
        from kvpress_like.models import load_model

        model, tokenizer = load_model(grid.model, dtype=getattr(torch, grid.dtype))
    todo = pending_units(grid, out, tokenizer, limit)
    bar = _progress(len(todo), grid.name, progress)
    started = time.perf_counter()
    with CellsFile(out) as cells:
        for batch in unit_batches(todo, grid.batch_size):
            for unit, record in zip(batch, run_units(model, tokenizer, grid, batch), strict=True):
                cells.append(record)
                bar.update(1)
                bar.set_postfix_str(f"{unit.key} {record['seconds']:.1f}s")
    bar.close()
    return finish_run(grid, out, started, len(todo), command)


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


def _progress(total: int, name: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the eval extra; without it the run is silent
        return _NoBar()
    return tqdm(total=total, desc=name, unit="cell", dynamic_ncols=True)
