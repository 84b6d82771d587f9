"""The ``attention`` scorer: softmax attention mass that the window's queries put on each prompt key.

This is the score of SnapKV (Li et al. 2024, window = last prompt tokens, pooled), of TOVA (Oren et al.
2024, window = the last token, averaged over all heads), of DapQ (Tian et al. 2026, arXiv 2603.11564,
Eq. 4: sum over pseudo queries of post-RoPE softmax attention) and of KVzip (Kim et al. 2025, arXiv
2505.23416, §3.2: the largest attention a key receives from any reconstruction query of its KV group,
``aggregation="max"``, ``gqa="max"``). The window's queries are scored at most ``block`` rows at a time,
and fewer when the keys are many, so one step's attention never holds more than :data:`STEP_ENTRIES`
probabilities however long the prompt or the window (a KVzip reconstruction has ~L rows): no L × L
matrix is ever built.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from kvpress_like.hookspecs import hookimpl
from kvpress_like.parts import LayerContext, PartConfig, Scorer


def window_attention(ctx: LayerContext, domain: Literal["visible", "prompt"] = "visible") -> torch.Tensor:
    """Causal softmax attention of each window query, ``[batch, kv_heads, group, window, prompt_length]``.

    ``domain="visible"`` normalises over every key the query sees in a normal forward (prompt and,
    for appended queries, earlier appended rows); ``"prompt"`` normalises over prompt keys only.
    """
    batch, q_heads, window, head_dim = ctx.queries.shape
    kv_heads, total = ctx.keys.shape[1], ctx.keys.shape[2]
    group = q_heads // kv_heads
    queries = ctx.queries.reshape(batch, kv_heads, group * window, head_dim).float() * ctx.scaling
    logits = (queries @ ctx.keys.float().transpose(-1, -2)).view(batch, kv_heads, group, window, total)
    # Every query sees the keys before its own row, so only the columns from the earliest query's next row on
    # (and, for "prompt", the appended rows) can be hidden: mask that tail, not [window, total].
    tail = min(int(ctx.query_rows.min()) + 1, total) if ctx.query_rows.numel() else total
    if domain == "prompt":
        tail = min(tail, ctx.prompt_length)
    key_rows = torch.arange(tail, total, device=logits.device)
    hidden = key_rows[None, :] > ctx.query_rows.to(logits.device)[:, None]  # [window, total - tail]: not yet seen
    if domain == "prompt":
        hidden |= key_rows[None, :] >= ctx.prompt_length
    logits[..., tail:].masked_fill_(hidden, float("-inf"))
    return logits.softmax(dim=-1)[..., : ctx.prompt_length]


def pool_scores(scores: torch.Tensor, pooling: str, kernel: int) -> torch.Tensor:
    """1-D pooling along the key axis (stride 1, zero padding counted, length preserved)."""
    if pooling == "none" or kernel == 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    if pooling == "avg":
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    else:
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    return pooled.reshape(shape)


def pool_before_window(scores: torch.Tensor, ctx: LayerContext, pooling: str, kernel: int) -> torch.Tensor:
    """Pool the keys that precede the window; keys from the window's first row on stay unpooled.

    As in SnapKV, whose window is force-kept: its own scores never bleed into the keys before it.
    Windows appended after the prompt (DapQ) precede no prompt key, so every key is pooled.
    """
    start = min(int(ctx.query_rows.min()), ctx.prompt_length) if ctx.query_rows.numel() else ctx.prompt_length
    if start == ctx.prompt_length:  # an appended window: every key is pooled
        return pool_scores(scores, pooling, kernel)
    return torch.cat([pool_scores(scores[..., :start], pooling, kernel), scores[..., start:]], dim=-1)


def reduce_group(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce ``[batch, kv_heads, group, L]`` over query heads: per KV group (mean|max) or all heads."""
    if how == "all_heads":
        return scores.mean(dim=(1, 2), keepdim=True).squeeze(2).expand(-1, scores.shape[1], -1)
    return scores.mean(dim=2) if how == "mean" else scores.amax(dim=2)


STEP_ENTRIES = 1 << 22
"""Most attention probabilities one scoring step holds (16 MiB in fp32): at 32k keys and 4 query heads, 32 rows."""


def rows_per_step(ctx: LayerContext, block: int) -> int:
    """Window rows scored together: ``block``, or fewer so that a step holds at most :data:`STEP_ENTRIES`."""
    batch, q_heads = ctx.queries.shape[:2]
    per_row = batch * q_heads * ctx.keys.shape[2]
    return max(1, min(block, STEP_ENTRIES // max(per_row, 1)))


def received_attention(
    ctx: LayerContext, how: Literal["sum", "mean", "max"], block: int, domain: Literal["visible", "prompt"] = "visible"
) -> torch.Tensor:
    """Attention each prompt key receives from the window's queries, ``[batch, kv_heads, group, L]``.

    Summed, averaged or maximised over the queries, :func:`rows_per_step` queries at a time (memory bounded
    by ``block`` rows and by :data:`STEP_ENTRIES`, whichever is smaller).
    """
    window = ctx.queries.shape[2]
    block = rows_per_step(ctx, block)
    total = None
    for start in range(0, max(window, 1), block):
        part = ctx if block >= window else dataclasses.replace(
            ctx, queries=ctx.queries[:, :, start : start + block], query_rows=ctx.query_rows[start : start + block]
        )
        probs = window_attention(part, domain)
        if how == "max":
            got = probs.amax(dim=3) if probs.shape[3] else probs.sum(dim=3)
            total = got if total is None else torch.maximum(total, got)
        else:
            got = probs.sum(dim=3)
            total = got if total is None else total + got
    return total / window if how == "mean" else total


class AttentionConfig(PartConfig):
    aggregation: Literal["sum", "mean", "max"] = Field(
        "sum", description="how the window's queries are combined (max: the largest attention received, KVzip)"
    )
    gqa: Literal["mean", "max", "all_heads"] = Field(
        "mean", description="reduction over query heads: per KV group (mean|max) or over all heads (TOVA)"
    )
    pooling: Literal["none", "avg", "max"] = Field("none", description="1-D pooling of scores along the keys")
    kernel: int = Field(7, ge=1, description="pooling kernel size (odd)")
    softmax_domain: Literal["visible", "prompt"] = Field(
        "visible", description="visible: every key the query sees; prompt: prompt keys only"
    )
    block: int = Field(256, ge=1, description="most window queries scored at a time (fewer when the keys are many: "
                       "one step holds at most 2^22 probabilities)")

    @model_validator(mode="after")
    def _odd_kernel(self):
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd so pooling keeps positions aligned, got {self.kernel}")
        return self


def attention_scores(ctx: LayerContext, config: AttentionConfig) -> torch.Tensor:
    """``[batch, kv_heads, L]`` attention scores of the window under ``config``."""
    per_head = received_attention(ctx, config.aggregation, config.block, config.softmax_domain)
    return pool_before_window(reduce_group(per_head, config.gqa), ctx, config.pooling, config.kernel)


class AttentionScorer(Scorer):
    """Sum, mean or max over window queries of causal softmax attention, GQA-reduced, optionally pooled."""

    name = "attention"
    summary = "softmax attention mass of the window's queries on each prompt key"
    Config = AttentionConfig

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return attention_scores(ctx, self.config)

    @property
    def merges_rounds(self) -> bool:
        return self.config.aggregation == "max"

    def merge_rounds(self, earlier: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """With ``max``, a held row keeps the largest attention any round's window gave it (KVzip's score
        over every reconstruction chunk, for the rows still held); otherwise this round's scores."""
        return torch.maximum(earlier, current) if self.merges_rounds else current


@hookimpl
def register_scorers():
    return [AttentionScorer]
