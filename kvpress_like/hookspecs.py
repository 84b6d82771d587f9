"""Every hook a kvpress_like plugin may implement (pluggy project name ``kvpress_like``).

Registration hooks return lists of part classes, architecture adapter classes or method specs; observer hooks are called
during compression and must not modify what they are given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from kvpress_like.adapters import ModelAdapter
    from kvpress_like.methods_spec import MethodSpec
    from kvpress_like.parts import Allocator, Scorer, Selector, WindowBuilder
    from kvpress_like.report import CompressionReport, LayerReport

PROJECT = "kvpress_like"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_window_builders() -> list[type[WindowBuilder]]:
    """Return window builder classes (which queries judge the prompt's keys)."""


@hookspec
def register_scorers() -> list[type[Scorer]]:
    """Return scorer classes (how keys are scored from the window's queries)."""


@hookspec
def register_allocators() -> list[type[Allocator]]:
    """Return budget allocator classes (how many tokens each layer keeps)."""


@hookspec
def register_selectors() -> list[type[Selector]]:
    """Return selector classes (which tokens are kept given scores and a budget)."""


@hookspec
def register_methods() -> list[MethodSpec]:
    """Return method specs: named assemblies of registered parts with their defaults."""


@hookspec
def register_adapters() -> list[type[ModelAdapter]]:
    """Return architecture adapter classes (model family → attention layers, query projection, RoPE)."""


@hookspec
def layer_compressed(layer_report: LayerReport, pipeline: object) -> None:
    """Observer: one attention layer's cache was just compressed."""


@hookspec
def prefill_compressed(report: CompressionReport, pipeline: object) -> None:
    """Observer: a whole prefill was compressed; ``report`` is final."""
