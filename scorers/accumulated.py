"""The ``accumulated`` scorer: attention each key receives from every prompt query (H2O).

Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models". The causal attention of all prompt queries is summed per key, in chunks of queries so memory
stays bounded per layer (see :func:`~kvpress_like.scorers.attention.rows_per_step`). ``aggregation="mean"``
divides by the number of queries that see each key (kvpress's observed-attention variant), which removes the
bias towards early tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvpress_like.hookspecs import hookimpl
from kvpress_like.parts import LayerContext, PartConfig, Scorer
from kvpress_like.scorers.attention import received_attention, reduce_group


class AccumulatedConfig(PartConfig):
    chunk: int = Field(256, ge=1, description="most queries per chunk (fewer when the keys are many: one chunk holds "
                       "at most 2^22 probabilities)")
    aggregation: Literal["sum", "mean"] = Field("sum", description="sum (H2O) or mean over the queries seeing a key")
    gqa: Literal["mean", "max", "all_heads"] = Field("mean", description="reduction over query heads")


class AccumulatedScorer(Scorer):
    """Sum over the window's queries (all prompt tokens for H2O) of causal softmax attention, chunked."""

    name = "accumulated"
    summary = "attention received from every window query, accumulated in chunks (H2O)"
    Config = AccumulatedConfig

    def score(self, ctx: LayerContext) -> torch.Tensor:
        total = received_attention(ctx, "sum", self.config.chunk)
        if self.config.aggregation == "mean":
            keys = torch.arange(ctx.prompt_length, device=total.device)
            seen_by = (ctx.query_rows.to(total.device)[:, None] >= keys[None, :]).sum(dim=0).clamp(min=1)
            total = total / seen_by
        return reduce_group(total, self.config.gqa)


@hookimpl
def register_scorers():
    return [AccumulatedScorer]
