"""Selectors: which prompt tokens are kept, given their scores and a budget."""

from __future__ import annotations

import torch
from pydantic import Field

from kvpress_like.errors import ConfigError
from kvpress_like.hookspecs import hookimpl
from kvpress_like.parts import PartConfig, Selector


class TopKConfig(PartConfig):
    sinks: int = Field(0, ge=0, description="first prompt tokens always kept (attention sinks)")
    recent: int = Field(0, ge=0, description="last prompt tokens always kept (recent window)")
    recent_fraction: float = Field(
        0.0, ge=0, le=1, description="share of the budget given to the most recent tokens (H2O uses 0.5)"
    )


class TopKSelector(Selector):
    """Per KV head, the ``budget`` highest-scoring prompt tokens; protected tokens count inside the budget."""

    name = "topk"
    summary = "per KV head top-k tokens, with optional protected sinks and recent window"
    Config = TopKConfig

    def protected_mask(self, prompt_length: int, budget: int, device: torch.device) -> torch.Tensor:
        """Sinks, the recent window and the recent share of the budget: always kept."""
        recent = max(self.config.recent, round(self.config.recent_fraction * budget))
        positions = torch.arange(prompt_length, device=device)
        return (positions < self.config.sinks) | (positions >= prompt_length - recent)

    def select(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        prompt_length = scores.shape[-1]
        protected = self.protected_mask(prompt_length, budget, scores.device)
        n_protected = int(protected.sum())
        if n_protected > budget:
            raise ConfigError(
                f"{n_protected} protected tokens (sinks={self.config.sinks}, recent={self.config.recent}) "
                f"do not fit a budget of {budget} tokens; lower sinks/recent or raise the budget"
            )
        ranked = scores.float().masked_fill(protected, float("inf"))
        kept = ranked.topk(budget, dim=-1).indices
        return kept.sort(dim=-1).values


@hookimpl
def register_selectors():
    return [TopKSelector]
