"""Scorers that need no queries: key norm, seeded random, recency.

* ``key_norm`` — keys with the lowest L2 norm are kept (Devoto et al. 2024, "A Simple and Effective
  L2 Norm-Based Strategy for KV Cache Compression").
* ``random`` — seeded uniform scores, the floor every ablation should beat.
* ``recency`` — later tokens score higher; with protected sinks this is StreamingLLM (Xiao et al. 2023).
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvpress_like.hookspecs import hookimpl
from kvpress_like.parts import LayerContext, PartConfig, Scorer


class KeyNormScorer(Scorer):
    """Score = −‖k‖₂: low-norm keys tend to draw the most attention, so they are kept."""

    name = "key_norm"
    summary = "negative L2 norm of each key (low-norm keys kept)"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return -ctx.keys[:, :, : ctx.prompt_length].float().norm(dim=-1)


class RandomConfig(PartConfig):
    seed: int = Field(0, description="base seed; layer i uses seed + i")


class RandomScorer(Scorer):
    """Uniform random scores from a seeded generator (same seed ⇒ same kept set, batched or alone: every
    sequence of a batch gets the scores it gets alone)."""

    name = "random"
    summary = "seeded uniform random scores"
    Config = RandomConfig

    def score(self, ctx: LayerContext) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.config.seed + ctx.layer_idx)
        batch, heads = ctx.keys.shape[:2]
        scores = torch.rand(1, heads, ctx.prompt_length, generator=generator).to(ctx.keys.device)
        return scores.expand(batch, -1, -1).clone()


class RecencyScorer(Scorer):
    """Score = position: the most recent tokens win."""

    name = "recency"
    summary = "token position (most recent tokens kept)"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        batch, heads = ctx.keys.shape[:2]
        positions = torch.arange(ctx.prompt_length, device=ctx.keys.device, dtype=torch.float32)
        return positions.expand(batch, heads, -1)


@hookimpl
def register_scorers():
    return [KeyNormScorer, RandomScorer, RecencyScorer]
