"""The schema of an ablation grid: methods × window builders × budgets × lengths × tasks × protocols.

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

:func:`candidate` builds the pipeline of one (method entry, budget); a method that keeps every token takes no
budget and is evaluated once, at :data:`~kvpress_like.eval.records.NO_BUDGET`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvpress_like.budget import Budget
from kvpress_like.errors import ConfigError
from kvpress_like.eval.engine import Candidate
from kvpress_like.eval.protocols import PROTOCOLS
from kvpress_like.eval.records import FULL, NO_BUDGET, budget_value
from kvpress_like.eval.tasks import DEFAULT_DEPTHS, Sample, load_jsonl, make_samples, task_spec
from kvpress_like.factory import build, needs_budget
from kvpress_like.methods_spec import PART_KINDS
from kvpress_like.plugins import get_registry

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

    @property
    def takes_budget(self) -> bool:
        """False for a method that keeps every token (``full``, also with part overrides)."""
        return needs_budget(self.method, **self.overrides)


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

    def planned_pairs(self) -> list[tuple[MethodEntry, str]]:
        """Every (method entry, budget) to evaluate beside the reference; a method that takes no budget once,
        at :data:`NO_BUDGET`."""
        return [(entry, budget) for entry in self.method_entries() if not entry.is_full
                for budget in ([str(b) for b in self.budgets] if entry.takes_budget else [NO_BUDGET])]

    def identity(self) -> dict[str, Any]:
        """What must not change between a run and its resumption."""
        return {k: getattr(self, k) for k in ("model", "dtype", "answer_prefix", "max_new_tokens", "data",
                                              "prompt_chunk", "interim_factor")}


def candidate(entry: MethodEntry, budget: str) -> Candidate:
    """The pipeline of ``entry`` at ``budget`` (as a record writes it); a method that takes no budget is built
    without one and recorded at :data:`NO_BUDGET`, whatever ``budget`` says."""
    if not entry.takes_budget:
        return Candidate(entry.name, NO_BUDGET, build(entry.method, **entry.overrides))
    return Candidate(entry.name, budget, build(entry.method, budget=budget_value(budget), **entry.overrides))


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


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{v}" for k, v in value.items()) + "}"
    return str(value)
