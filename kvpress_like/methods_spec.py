"""A method is data: a named assembly of registered parts with their default options."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

PART_KINDS = ("window", "scorer", "allocator", "selector")


class PartChoice(BaseModel):
    """One part of a method: its registered name and the options given to its config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class MethodSpec(BaseModel):
    """A compression method: four part choices, a citation and how the code departs from the paper."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    summary: str
    paper: str | None = None
    departures: str | None = None
    window: PartChoice
    scorer: PartChoice
    allocator: PartChoice = PartChoice(name="uniform")
    selector: PartChoice = PartChoice(name="topk")

    def part(self, kind: str) -> PartChoice:
        return getattr(self, kind)

    def variant(self, name: str, summary: str, paper: str, **changes: Any) -> MethodSpec:
        """This method with some parts (or notes) changed; ``paper`` is cited on top of this method's paper."""
        cited = f"{paper} on {self.paper}"
        return self.model_copy(update={"name": name, "summary": summary, "paper": cited, **changes})
