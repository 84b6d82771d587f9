"""When and with which queries a cache is compressed while generating: the decode schedule.

``build(name, budget=..., decoding={"interval": 128, "target": 512})`` compresses the prompt as the method
always does, then keeps compressing while tokens are generated: whenever a layer holds ``target + interval``
rows it is cut back to ``target`` (or, with ``{"ratio": r}``, to ``ceil(r × tokens seen)`` per sequence), so
the physical cache never exceeds ``target + interval`` rows per layer during one-token steps.

The decode window says which queries judge the rows at an event (the scorer, selector and protected tokens
are the method's own):

* ``recent`` — the last ``window_size`` queries the model computed (SnapKV-D / R-KV style), taken from the
  attention call: nothing is recomputed.
* ``reaimed`` — the same queries rotated by RoPE to the positions that will read the cache next,
  t … t+W−1 ("where > what": DapQ's position alignment without an extra forward).
* ``pseudo`` — DapQ-D, faithful: ``window_size`` pseudo tokens (the prompt's first ``prefix`` ids, then the
  last ids seen) run through the model at positions t … t+N−1, one extra forward per event.
* ``none`` — no queries (position or key-only scorers: StreamingLLM, K-norm).

By default a method keeps the spirit of its prefill window: ``pseudo`` for DapQ's windows, ``none`` for
methods without queries, ``recent`` for the others, with the prefill window's size.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvpress_like.errors import ConfigError

DecodeWindow = Literal["recent", "reaimed", "pseudo", "none"]
DEFAULT_WINDOW_SIZE = 32
WINDOW_BY_PREFILL_WINDOW: dict[str, DecodeWindow] = {"pseudo": "pseudo", "union": "pseudo", "none": "none"}
"""Default decode window of a method, by the name of its prefill window (``recent`` for any other)."""


class DecodingConfig(BaseModel):
    """A decode schedule: ``interval`` and exactly one of ``target`` (rows per layer) and ``ratio``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interval: int = Field(128, ge=1, description="rows a layer may grow past its target before it is cut back")
    target: int | None = Field(None, ge=1, description="rows per layer and KV head kept at an event")
    ratio: float | None = Field(None, gt=0, le=1, description="share of the tokens seen kept at an event")
    window: DecodeWindow | None = Field(None, description="queries that judge the rows (default: the method's)")
    window_size: int | None = Field(None, ge=1, description="queries in the window (default: the method's)")
    prefix: int | None = Field(None, ge=0, description="pseudo window: leading prompt ids that open its content "
                               "(default: min(4, window_size // 2))")

    @model_validator(mode="after")
    def _one_size(self) -> DecodingConfig:
        if (self.target is None) == (self.ratio is None):
            raise ValueError("give exactly one of target (rows per layer, e.g. 512) and ratio (e.g. 0.25)")
        return self

    def resolved(self, prefill_window) -> DecodingConfig:
        """This schedule with the window and its size filled in from the method's prefill window part."""
        window = self.window or WINDOW_BY_PREFILL_WINDOW.get(prefill_window.name, "recent")
        options = prefill_window.config
        size = self.window_size or getattr(options, "n_pseudo", None) or getattr(options, "size", None)
        size = size or DEFAULT_WINDOW_SIZE
        prefix = min(4, size // 2) if self.prefix is None else self.prefix
        if window == "pseudo" and prefix >= size:
            raise ConfigError(f"the pseudo decode window's prefix ({prefix}) must be below its size ({size})")
        return self.model_copy(update={"window": window, "window_size": size, "prefix": prefix})

    def target_for(self, seen: int) -> int:
        """Rows a sequence that has seen ``seen`` tokens keeps at an event."""
        if self.target is not None:
            return self.target
        return max(1, math.ceil(self.ratio * seen - 1e-9))  # the tolerance: 0.25 × 400 is 100, not 101


def parse_decoding(decoding: Any) -> DecodingConfig | None:
    """``None``, a :class:`DecodingConfig` or a dict of its fields, validated with an error naming the fields."""
    if decoding is None or isinstance(decoding, DecodingConfig):
        return decoding
    if not isinstance(decoding, dict):
        raise ConfigError(f"decoding must be a dict such as {{'interval': 128, 'target': 512}}, got {decoding!r}")
    try:
        return DecodingConfig.model_validate(decoding)
    except ValidationError as error:
        valid = ", ".join(f"{name}={field.default!r}" for name, field in DecodingConfig.model_fields.items())
        messages = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg'].removeprefix('Value error, ')}"
            for e in error.errors()
        )
        raise ConfigError(f"invalid decoding schedule: {messages}; valid fields (with defaults): {valid}") from None
