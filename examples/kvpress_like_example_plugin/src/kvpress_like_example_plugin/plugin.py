"""Example kvpress_like plugin: the ``example_peak`` scorer and the ``example_dapq_peak`` method.

The scorer keeps the keys that *some* window query focuses on: for each prompt key, the largest causal
softmax attention any window query puts on it (DapQ's Eq. 4 sums that attention instead).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvpress_like import ConfigError, MethodSpec, PartChoice, hookimpl
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
        batch, q_heads, window, head_dim = ctx.queries.shape
        if window == 0:
            raise ConfigError("the example_peak scorer needs query rows: pick a window other than 'none'")
        kv_heads, rows = ctx.keys.shape[1], ctx.keys.shape[2]
        group = q_heads // kv_heads
        # Query head h reads KV head h // group: stack each group's queries against its keys. O(window × rows).
        queries = ctx.queries.reshape(batch, kv_heads, group * window, head_dim).float()
        logits = queries @ ctx.keys.float().transpose(-1, -2) * (ctx.scaling / self.config.temperature)
        visible = torch.arange(rows, device=logits.device) <= ctx.query_rows.to(logits.device)[:, None]
        logits = logits.masked_fill(~visible.repeat(group, 1), float("-inf"))  # causal, as in the forward
        probs = logits.softmax(dim=-1)[..., : ctx.prompt_length]  # only prompt keys are candidates
        peak = probs.reshape(batch, kv_heads, group, window, ctx.prompt_length).amax(dim=3)
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
