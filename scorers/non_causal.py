"""The ``non_causal_attention`` scorer: bidirectional attention inside fixed chunks of the prompt (Compactor).

Chari & Van Durme 2025, "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage
Scores" (arXiv 2507.08143), as kvpress's ``NonCausalAttnPress`` computes it. The prompt rows are cut into chunks
of ``chunk`` rows; each query attends, without a causal mask, to the keys of its own chunk; the attention a key
receives is summed over the chunk's queries, averaged over its KV group, multiplied by ‖v‖, average-pooled
(kernel 3, zero padding counted) and z-scored. The logits are unscaled (no 1/√d), as in the official code.
Memory is ``O(L × chunk)`` per layer. The window must give the prompt's own rows as queries (``prompt``); query
rows outside the prompt are ignored.

Departure: the z-score is taken per sequence (over its heads and tokens) instead of over the whole batch, so a
sequence keeps the same tokens alone or batched. A z-score does not change any head's ranking; it only matters
when the scores are blended with others or compared across heads.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvpress_like.hookspecs import hookimpl
from kvpress_like.parts import LayerContext, PartConfig, Scorer
from kvpress_like.scorers.attention import pool_scores


class NonCausalConfig(PartConfig):
    chunk: int = Field(256, ge=1, description="prompt rows per bidirectional chunk (kvpress: 256)")
    kernel: int = Field(3, ge=1, description="average-pooling kernel along the keys (1 = none)")


def z_scored(scores: torch.Tensor) -> torch.Tensor:
    """``[B, H, L]`` scores standardised per sequence over its heads and tokens."""
    flat = scores.flatten(1)
    mean = flat.mean(dim=1)[:, None, None]
    std = flat.std(dim=1).clamp_min(1e-6)[:, None, None] if flat.shape[1] > 1 else torch.ones_like(mean)
    return (scores - mean) / std


def chunked_received_attention(ctx: LayerContext, chunk: int) -> torch.Tensor:
    """``[B, H_q, L]``: attention each prompt key receives from the prompt query rows of its chunk, no causal mask."""
    batch, q_heads, _, _ = ctx.queries.shape
    length, group = ctx.prompt_length, ctx.num_kv_groups
    rows = ctx.query_rows.to(ctx.queries.device)
    received = torch.zeros(batch, q_heads, length, device=ctx.queries.device)
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        picked = torch.nonzero((rows >= start) & (rows < stop)).flatten()
        if not picked.numel():
            continue
        queries = ctx.queries[:, :, picked].float()  # [B, H_q, n, D]
        keys = ctx.keys[:, :, start:stop].float().repeat_interleave(group, dim=1)  # [B, H_q, c, D]
        received[..., start:stop] = (queries @ keys.transpose(-1, -2)).softmax(dim=-1).sum(dim=2)
    return received


class NonCausalAttentionScorer(Scorer):
    """Chunked bidirectional attention of the prompt's queries, × ‖v‖, pooled, z-scored per sequence."""

    name = "non_causal_attention"
    summary = "bidirectional attention inside prompt chunks, × value norm, pooled, z-scored (Compactor)"
    Config = NonCausalConfig

    def score(self, ctx: LayerContext) -> torch.Tensor:
        received = chunked_received_attention(ctx, self.config.chunk)
        batch, q_heads, length = received.shape
        per_kv = received.view(batch, q_heads // ctx.num_kv_groups, ctx.num_kv_groups, length).mean(dim=2)
        weighted = per_kv * ctx.values[:, :, :length].float().norm(dim=-1)
        return z_scored(pool_scores(weighted, "avg", self.config.kernel))


@hookimpl
def register_scorers():
    return [NonCausalAttentionScorer]
