"""The one place that knows how transformers' API drifts between 5.x releases.

* 5.24 calls the cache argument ``cache``; 5.17 (and 5.0) call it ``past_key_values``.
* Model outputs carry the cache as ``.cache`` or ``.past_key_values`` accordingly.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


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
