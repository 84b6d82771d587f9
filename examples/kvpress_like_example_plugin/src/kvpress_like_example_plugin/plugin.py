"""Example kvpress_like plugin: the ``example_peak`` scorer and the ``example_dapq_peak`` method.

The scorer keeps the keys that *some* window query focuses on: for each prompt key, the largest causal
softmax attention any window query puts on it (DapQ's Eq. 4 sums that attention instead).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field

from kvpress_like import ConfigError, MethodSpec, PartChoice, hookimpl, window_attention
from kvpress_like.parts import LayerContext, PartConfig, Scorer


class PeakAttentionConfig(PartConfig):
    gqa: Literal["mean", "max"] = Field("max", description="how the query heads of one KV group are combined")
    temperature: float = Field(1.0, gt=0, description="softmax temperature; above 1 flattens the attention")


class PeakAttentionScorer(Scorer):
    """The peak causal softmax attention that any window query puts on each prompt key."""

    name = "example_peak"
    summary = "largest attention any window query puts on a key (example plugin)"
    Config = PeakAttentionConfig

    def score(self, ctx: LayerContext) -> torch.Tensor:
        if ctx.queries.shape[2] == 0:
            raise ConfigError("the example_peak scorer needs query rows: pick a window other than 'none'")
        # Causal softmax attention of every window query on the prompt keys, [batch, kv_heads, group, window, L]:
        # query head h reads KV head h // group, as in the forward. O(window × rows); a temperature scales the logits.
        probs = window_attention(replace(ctx, scaling=ctx.scaling / self.config.temperature))
        peak = probs.amax(dim=3)  # the largest attention any window query puts on each key
        return peak.mean(dim=2) if self.config.gqa == "mean" else peak.amax(dim=2)  # [batch, kv_heads, L]


EXAMPLE_DAPQ_PEAK = MethodSpec(
    name="example_dapq_peak",
    summary="DapQ's pseudo queries, scored by their peak attention instead of its sum (example plugin)",
    paper="window: Tian et al. 2026, arXiv 2603.11564; the scorer is this example's",
    departures="Eq. 4 sums the attention over the pseudo queries; this method takes its maximum",
    window=PartChoice(name="pseudo", options={"n_pseudo": 32, "prefix": 4}),
    scorer=PartChoice(name="example_peak"),
)


@hookimpl
def register_scorers():
    return [PeakAttentionScorer]


@hookimpl
def register_methods():
    return [EXAMPLE_DAPQ_PEAK]
