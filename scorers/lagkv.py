"""The ``lag_kv`` scorer: lag-relative statistics of keys and values, partition by partition (LagKV).

Liang et al. 2025, "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important"
(arXiv 2504.04704), as kvpress's ``LagKVPress`` computes it. After the first ``n_sink`` tokens the prompt is cut
into partitions of ``lag`` tokens; the last full partition and the incomplete rest form the tail. Each earlier
partition is judged against the *next* one: keys (and values) are min–max normalised per channel by the next
partition's range, the standard deviation over channels is taken, and a softmax over the partition's tokens
turns it into a share; key and value shares are averaged. With ``rank=True`` (kvpress's default, no
``cross_scoring``) a token's score is its rank inside its partition divided by ``lag``, so every partition keeps
about the same share of its tokens. Sinks and the tail score 1, above every ranked token. A prompt shorter than
``n_sink + 2·lag`` is not partitioned: sinks score 1 and later tokens their recency, so the selection is
StreamingLLM's. Attention-free.

Departure: none in the scores; equal scores (the same rank in two partitions) are broken by the selector's
top-k, as in kvpress.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvpress_like.hookspecs import hookimpl
from kvpress_like.parts import LayerContext, PartConfig, Scorer


class LagKVConfig(PartConfig):
    n_sink: int = Field(4, ge=0, description="first tokens scored 1 (attention sinks)")
    lag: int = Field(128, ge=2, description="partition size; each partition is judged against the next one")
    rank: bool = Field(True, description="score = rank inside the partition / lag (kvpress's default); False keeps "
                       "the raw shares, comparable across partitions (kvpress's cross_scoring, for Ada-KV)")


def lag_relative_share(states: torch.Tensor, lag: int) -> torch.Tensor:
    """``states`` ``[B, H, n·lag, D]`` → ``[B, H, (n−1)·lag]``: each of the first ``n−1`` partitions normalised by
    the next partition's per-channel range, std over channels, softmax over the partition's tokens."""
    blocks = states.unflatten(2, (-1, lag))  # [B, H, n, lag, D]
    reference, judged = blocks[:, :, 1:], blocks[:, :, :-1]
    low = reference.amin(dim=3, keepdim=True)
    high = reference.amax(dim=3, keepdim=True)
    spread = ((judged - low) / (high - low)).std(dim=-1)  # [B, H, n-1, lag]
    return spread.softmax(dim=-1).flatten(2)


class LagKVScorer(Scorer):
    """Per-partition lag-relative key/value statistics; sinks and the tail score highest."""

    name = "lag_kv"
    summary = "lag-relative min-max-normalised std of keys and values, partition by partition (LagKV)"
    Config = LagKVConfig

    def score(self, ctx: LayerContext) -> torch.Tensor:
        n_sink, lag, length = self.config.n_sink, self.config.lag, ctx.prompt_length
        batch, heads = ctx.keys.shape[:2]
        scores = torch.ones(batch, heads, length, device=ctx.keys.device)
        if length < n_sink + 2 * lag:
            if length > n_sink:
                scores[..., n_sink:] = torch.arange(length - n_sink, device=scores.device) / (length - n_sink)
            return scores
        end = n_sink + (length - n_sink) // lag * lag  # the last full partition and the rest form the tail
        share = (lag_relative_share(ctx.keys[:, :, n_sink:end].float(), lag)
                 + lag_relative_share(ctx.values[:, :, n_sink:end].float(), lag)) / 2
        if self.config.rank:
            share = share.unflatten(-1, (-1, lag)).argsort(dim=-1).argsort(dim=-1).flatten(-2) / lag
        scores[..., n_sink : end - lag] = share
        return scores


@hookimpl
def register_scorers():
    return [LagKVScorer]
