"""The cache budget: how many prompt tokens each layer's KV heads keep."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

_VALID = (
    "a budget is a positive int of tokens (256), a float ratio in (0, 1] (0.03) "
    "or a percent string in (0%, 100%] ('3%')"
)


class Budget(BaseModel):
    """Tokens kept per KV head and layer, either absolute or relative to the prompt length.

    Exactly one of ``tokens`` and ``ratio`` is set. Build one from a plain value with
    ``Budget.model_validate(256)``, ``Budget.model_validate(0.03)`` or ``Budget.model_validate("3%")``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tokens: int | None = None
    ratio: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_scalar(cls, value: Any) -> Any:
        if isinstance(value, Budget):
            return value.model_dump()
        if isinstance(value, dict):
            return value
        return _parse_scalar(value)

    @field_validator("tokens", "ratio", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"got {value!r}; {_VALID}")
        return value

    @model_validator(mode="after")
    def _check(self) -> Budget:
        if (self.tokens is None) == (self.ratio is None):
            raise ValueError(f"set exactly one of tokens and ratio; {_VALID}")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}; {_VALID}")
        if self.ratio is not None and not (0 < self.ratio <= 1):
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}; {_VALID}")
        return self

    def resolve(self, prompt_length: int) -> int:
        """Tokens to keep for a prompt of ``prompt_length`` tokens: ``min(budget, prompt_length)``.

        A ratio is rounded to the nearest token and never resolves below one token.
        """
        wanted = self.tokens if self.tokens is not None else max(1, round(self.ratio * prompt_length))
        return min(wanted, prompt_length)

    def __str__(self) -> str:
        return f"{self.tokens} tokens" if self.tokens is not None else f"{self.ratio:.4g} of the prompt"


def _parse_scalar(value: Any) -> dict[str, Any]:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"got {value!r}; {_VALID}")
    if isinstance(value, int):
        return {"tokens": value}
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"got {value!r}; {_VALID}")
        if value > 1:
            raise ValueError(f"a float budget is a ratio in (0, 1], got {value}; use an int for a token count")
        return {"ratio": value}
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                raise ValueError(f"cannot read {value!r} as a percent; {_VALID}") from None
            if not math.isfinite(percent) or not (0 < percent <= 100):
                raise ValueError(f"a percent budget must be in (0%, 100%], got {value!r}")
            return {"ratio": percent / 100}
        if text.isdigit():
            return {"tokens": int(text)}
        raise ValueError(f"cannot read {value!r} as a budget; {_VALID}")
    raise ValueError(f"got a {type(value).__name__}; {_VALID}")
