"""Building pipelines from method names, overrides and declarative specs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kvpress_like.budget import Budget
from kvpress_like.decode_schedule import parse_decoding
from kvpress_like.errors import ConfigError
from kvpress_like.methods_spec import PART_KINDS, PartChoice
from kvpress_like.parts import Part
from kvpress_like.pipeline import Pipeline
from kvpress_like.plugins import get_registry

SPEC_KEYS = ("method", "budget", *PART_KINDS, "decoding")


def build(method: str, budget: Any = None, decoding: Any = None, **overrides: Any) -> Pipeline:
    """A pipeline for the registered ``method`` with ``budget`` and optional part overrides.

    ``decoding`` (``{"interval": 128, "target": 512}``, or ``{"ratio": 0.25}``; see
    :mod:`kvpress_like.decode_schedule`) also compresses the cache while tokens are generated.

    An override is a part name (``window="semantic"``: that part with its defaults), a dict of
    options merged into the method's part (``scorer={"pooling": "max", "kernel": 7}``), or a dict with
    a ``name`` (``window={"name": "suffix", "size": 64}``: that part with those options).
    """
    unknown = sorted(set(overrides) - set(PART_KINDS))
    if unknown:
        raise ConfigError(f"unknown override(s) {unknown}; valid overrides are: {', '.join(PART_KINDS)}")
    spec = get_registry().method(method)
    choices = {kind: _merge(kind, spec.part(kind), overrides.get(kind)) for kind in PART_KINDS}
    return _assemble(method, budget, choices, decoding)


def needs_budget(method: str, **overrides: Any) -> bool:
    """False for a method whose allocator (after ``overrides``, as :func:`build` takes them) keeps every token
    (``full``): it takes no budget."""
    allocator = _merge("allocator", get_registry().method(method).part("allocator"), overrides.get("allocator"))
    return get_registry().part_class("allocator", allocator.name).uses_budget


def build_from_spec(spec: dict[str, Any] | str | Path) -> Pipeline:
    """A pipeline from a dict or a YAML file: ``method`` (optional base), ``budget`` and part entries."""
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"spec file {str(path)!r} does not exist")
        spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict):
        raise ConfigError(f"a spec must be a mapping with keys {', '.join(SPEC_KEYS)}; got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"unknown spec key(s) {unknown}; valid keys are: {', '.join(SPEC_KEYS)}")
    parts = {kind: spec[kind] for kind in PART_KINDS if kind in spec}
    if "method" in spec:
        return build(spec["method"], spec.get("budget"), spec.get("decoding"), **parts)
    missing = [kind for kind in ("window", "scorer") if kind not in parts]
    if missing:
        raise ConfigError(f"a spec without 'method' must name its {' and '.join(missing)}")
    defaults = {"allocator": PartChoice(name="uniform"), "selector": PartChoice(name="topk")}
    choices = {kind: _merge(kind, defaults.get(kind), parts.get(kind)) for kind in PART_KINDS}
    return _assemble(None, spec.get("budget"), choices, spec.get("decoding"))


def _merge(kind: str, current: PartChoice | None, override: Any) -> PartChoice:
    if override is None:
        return current
    if isinstance(override, PartChoice):
        return override
    if isinstance(override, str):
        return PartChoice(name=override)
    if isinstance(override, dict):
        options = dict(override)
        name = options.pop("name", current.name if current else None)
        if name is None:
            raise ConfigError(f"the {kind} entry needs a 'name'")
        base = current.options if current is not None and name == current.name else {}
        return PartChoice(name=name, options={**base, **options})
    raise ConfigError(f"{kind} must be a part name or a dict of options, got {type(override).__name__}")


def _assemble(method: str | None, budget: Any, choices: dict[str, PartChoice], decoding: Any = None) -> Pipeline:
    parts = [_instantiate(kind, choices[kind]) for kind in PART_KINDS]
    allocator = parts[PART_KINDS.index("allocator")]
    if not allocator.uses_budget:
        if budget is not None:
            raise ConfigError(
                f"{method or 'this spec'!r} keeps every token (allocator {allocator.name!r}); do not pass a budget"
            )
        budget = 1.0
    if budget is None:
        raise ConfigError("a budget is required: an int of tokens (256), a ratio (0.03) or a percent ('3%')")
    try:
        resolved_budget = Budget.model_validate(budget)
    except ValidationError as error:
        raise ConfigError(f"invalid budget {budget!r}: {_messages(error)}") from None
    return Pipeline(method, resolved_budget, *parts, decoding=parse_decoding(decoding))


def _instantiate(kind: str, choice: PartChoice) -> Part:
    cls = get_registry().part_class(kind, choice.name)
    try:
        config = cls.Config.model_validate(choice.options)
    except ValidationError as error:
        valid = ", ".join(f"{name}={field.default!r}" for name, field in cls.Config.model_fields.items())
        raise ConfigError(
            f"invalid options for {kind} {choice.name!r}: {_messages(error)}; "
            f"valid options (with defaults): {valid or '(none)'}"
        ) from None
    return cls(config)


def _messages(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg'].removeprefix('Value error, ')}" for e in error.errors()
    )
