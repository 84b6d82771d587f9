"""The one place that knows how transformers' API drifts between 5.x releases.

* 5.24 calls the cache argument ``cache``; 5.17 (and 5.0) call it ``past_key_values``.
* Model outputs carry the cache as ``.cache`` or ``.past_key_values`` accordingly.
* Sliding-window cache layers can keep rows past their window for one forward (``record_past``) only
  in releases that have ``activate_past_recording``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from kvpress_like.errors import UnsupportedModelError


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the cache argument of ``model.forward`` in the installed transformers."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_from_hook_kwargs(kwargs: dict[str, Any]):
    """The cache an attention module was called with, whatever its keyword."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def model_inputs(model: torch.nn.Module, cache, **inputs: Any) -> dict[str, Any]:
    """Forward keyword arguments with the cache under the installed name."""
    return {**inputs, cache_kwarg(model): cache, "use_cache": True}


def record_sliding_past(layer) -> None:
    """Make a sliding-window cache layer keep every row of the next forward (until it is cut back)."""
    if not hasattr(layer, "activate_past_recording"):
        raise UnsupportedModelError(
            "this transformers release cannot make sliding-window cache layers keep rows past their window, "
            "which a window appended after the prompt needs on hybrid models; upgrade transformers (>= 5.24) "
            "or use a window inside the prompt (e.g. window='suffix')"
        )
    layer.activate_past_recording()
