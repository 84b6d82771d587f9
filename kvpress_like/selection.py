"""Selectors: which prompt tokens are kept, given their scores and a budget.

Every selector ranks by the real part of the scores; ``critical`` also reads the first-stage scores that
a two-stage scorer puts in the imaginary part (see :class:`kvpress_like.parts.Scorer`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvpress_like.allocators import _round_exact
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
        protected = self.checked_protected_mask(scores.shape[-1], budget, scores.device)
        ranked = scores.real.float().masked_fill(protected, float("inf"))
        kept = ranked.topk(budget, dim=-1).indices
        return kept.sort(dim=-1).values


class ChunkConfig(TopKConfig):
    chunk_size: int = Field(16, ge=1, description="tokens per chunk")
    aggregation: Literal["mean", "max"] = Field("mean", description="chunk score from its tokens' scores")
    alignment: Literal["start", "end"] = Field(
        "start", description="chunks tile the prompt from its first token (start) or end at its last token (end)"
    )


class ChunkSelector(TopKSelector):
    """Whole chunks of consecutive tokens, best chunk score first (ChunkKV, Liu et al. 2025).

    Protected tokens are kept first; the rest of the budget takes whole chunks in order of their score
    (the mean or max of their unprotected tokens' scores); when the budget ends inside a chunk, that
    chunk's best tokens fill it, so the kept count is exactly the budget.
    """

    name = "chunk"
    summary = "whole chunks of consecutive tokens ranked by mean/max score (ChunkKV)"
    Config = ChunkConfig

    def chunk_ids(self, prompt_length: int, device: torch.device) -> torch.Tensor:
        size = self.config.chunk_size
        shift = (-prompt_length) % size if self.config.alignment == "end" else 0
        return (torch.arange(prompt_length, device=device) + shift) // size

    def select(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        prompt_length = scores.shape[-1]
        protected = self.checked_protected_mask(prompt_length, budget, scores.device)
        ids = self.chunk_ids(prompt_length, scores.device)
        n_chunks = int(ids[-1]) + 1
        free = scores.real.float().masked_fill(protected, float("nan"))
        index = ids.expand_as(free)
        if self.config.aggregation == "mean":
            total = torch.zeros(*free.shape[:2], n_chunks, device=free.device).scatter_add_(
                -1, index, free.nan_to_num(0.0)
            )
            count = torch.zeros(n_chunks, device=free.device).scatter_add_(0, ids, (~protected).float())
            chunk_score = (total / count).nan_to_num(float("-inf"))
        else:
            chunk_score = torch.full((*free.shape[:2], n_chunks), float("-inf"), device=free.device)
            chunk_score = chunk_score.scatter_reduce(-1, index, free.nan_to_num(float("-inf")), "amax")
        chunk_rank = chunk_score.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0 = best
        token_rank = chunk_rank.gather(-1, index).masked_fill(protected, -1)  # protected tokens come first
        # lexicographic order: chunk rank, then the token's own score inside its chunk
        by_score = free.nan_to_num(float("inf")).argsort(dim=-1, descending=True, stable=True)
        by_chunk = token_rank.gather(-1, by_score).argsort(dim=-1, stable=True)
        kept = by_score.gather(-1, by_chunk)[..., :budget]
        return kept.sort(dim=-1).values


class CriticalConfig(TopKConfig):
    first_stage_ratio: float = Field(
        0.5, ge=0, le=1, description="share of the budget chosen by the first-stage scores alone"
    )


class CriticalSelector(TopKSelector):
    """CriticalKV's two-stage selection (Feng et al. 2025): first the ``round(first_stage_ratio × budget)``
    tokens with the highest first-stage scores (the imaginary part: plain attention from the ``critical``
    scorer), then the rest of the budget by the scores proper (the real part). Protected tokens count
    inside the budget and come first. Real scores are their own first stage: this is then top-k.
    """

    name = "critical"
    summary = "first part of the budget by first-stage scores, the rest by the scores (CriticalKV)"
    Config = CriticalConfig

    def select(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        weighted = scores.real
        first_stage = scores.imag if scores.is_complex() else weighted
        first = min(round(self.config.first_stage_ratio * budget), scores.shape[-1])
        if first:
            chosen = first_stage.topk(first, dim=-1).indices
            boost = weighted.amax(dim=-1, keepdim=True) + 1  # finite: protected tokens (+inf) still rank first
            weighted = weighted.scatter(-1, chosen, boost.expand_as(chosen) + first_stage.gather(-1, chosen))
        return super().select(weighted, budget)


class SegmentConfig(TopKConfig):
    segment_size: int = Field(1024, ge=1, description="prompt tokens per segment (kvpress ChunkPress: 1024)")


class SegmentSelector(TopKSelector):
    """The same share of every segment of the prompt (kvpress's ``ChunkPress``, after FINCH, Corallo &
    Papotti 2024, TACL): the prompt is cut into segments of ``segment_size`` tokens and each keeps its best tokens.

    Protected tokens are kept first; the rest of the budget is split across the segments in proportion to their
    unprotected tokens (largest-remainder rounding, so the layer keeps exactly its budget), and each segment
    keeps its highest-scoring unprotected tokens within its share. Departures from kvpress: the scores come from
    one scoring of the whole prompt (kvpress scores each chunk on its own, so e.g. a SnapKV window is each
    chunk's end); shares are rounded to the exact budget instead of ``max(1, ⌊n·(1 − ratio)⌋)`` per chunk.
    """

    name = "segments"
    summary = "the same share of every prompt segment, top-k inside each (kvpress ChunkPress)"
    Config = SegmentConfig

    def segment_shares(self, protected: torch.Tensor, budget: int) -> list[int]:
        """Unprotected tokens each segment keeps: ``budget − protected`` split in proportion to its free tokens."""
        free = (~protected).float().split(self.config.segment_size)
        counts = [float(chunk.sum()) for chunk in free]
        spare, total = budget - int(protected.sum()), sum(counts)
        if total == 0:
            return [0] * len(counts)
        return _round_exact([spare * c / total for c in counts], spare)

    def select(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        prompt_length = scores.shape[-1]
        protected = self.checked_protected_mask(prompt_length, budget, scores.device)
        free = scores.real.float().masked_fill(protected, float("-inf"))
        kept = [torch.nonzero(protected).flatten().expand(*scores.shape[:2], -1)]
        size = self.config.segment_size
        for n, share in enumerate(self.segment_shares(protected, budget)):
            if share:
                kept.append(n * size + free[..., n * size : (n + 1) * size].topk(share, dim=-1).indices)
        return torch.cat(kept, dim=-1).sort(dim=-1).values


class ThresholdConfig(PartConfig):
    threshold: float = Field(..., description="tokens scoring below this (in the scorer's units) are evicted")
    sinks: int = Field(4, ge=0, description="first prompt tokens always kept (attention sinks)")
    recent: int = Field(128, ge=0, description="last prompt tokens always kept (the protected recent window)")


class ThresholdSelector(TopKSelector):
    """DMS-style eviction by a score threshold (Łańcucki et al. 2025, arXiv 2506.05345; KVzap's ``DMSPress``):
    a token is evicted when its score is below ``threshold`` and it is neither a sink nor in the recent window.

    Each KV head keeps as many tokens as pass, so the kept share is an output of the scores, not an input: it is
    in the report's kept indices (:attr:`~kvpress_like.report.CompressionReport.kept_fraction`). The layer budget
    caps it (a method built with the ``full`` allocator has no cap); under a cap a head keeps its best tokens.
    """

    name = "threshold"
    summary = "evict tokens scoring below a threshold outside the sinks and a recent window (DMS, KVzap)"
    Config = ThresholdConfig
    decides_counts = True

    def protected_mask(self, prompt_length: int, budget: int, device: torch.device) -> torch.Tensor:
        positions = torch.arange(prompt_length, device=device)
        return (positions < self.config.sinks) | (positions >= prompt_length - self.config.recent)

    def head_counts(self, scores: torch.Tensor, protected: torch.Tensor, layer_budget: int) -> torch.Tensor:
        passing = protected | (scores.real >= self.config.threshold)
        return passing.sum(dim=-1).clamp(max=layer_budget).cpu()


@hookimpl
def register_selectors():
    return [TopKSelector, ChunkSelector, CriticalSelector, SegmentSelector, ThresholdSelector]
