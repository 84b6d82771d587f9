"""The pure per-layer step of every compression: scores in, the kept rows out.

Whenever compression runs — at the end of a prompt, after each prompt chunk, or at a decode-time event —
one layer is compressed the same way: the scorer rates every candidate row from the window's queries
(:func:`score_layer`), the selector's protected tokens are fixed once, the allocator splits the layer's
budget over its (sequence, KV head) pairs, the selector picks each pair's rows, and the rows are gathered
(:func:`select_rows`). Nothing here touches a model, a hook or a cache: the schedules
(:mod:`kvpress_like.compressor` for prefills, :mod:`kvpress_like.decode_compression` while generating) decide
*when* a layer is compressed and *where* its kept rows go.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress_like.parts import Allocator, LayerContext, Scorer, Selector


@dataclass
class LayerSelection:
    """One layer's kept rows: indices into its candidate rows (sorted) and the kept keys and values.

    Dense when every (sequence, KV head) keeps the same count — ``kept`` ``[batch, kv_heads, k]``, keys and
    values ``[batch, kv_heads, k, head_dim]``; otherwise per (sequence, head) lists of 1-D indices and
    ``[k, head_dim]`` tensors (:attr:`ragged`).
    """

    kept: torch.Tensor | list[list[torch.Tensor]]
    keys: torch.Tensor | list[list[torch.Tensor]]
    values: torch.Tensor | list[list[torch.Tensor]]

    @property
    def ragged(self) -> bool:
        return not isinstance(self.keys, torch.Tensor)


def score_layer(scorer: Scorer, ctx: LayerContext) -> torch.Tensor:
    """``[batch, kv_heads, ctx.prompt_length]`` scores of the candidate rows (real, or complex for two stages)."""
    return scorer.score(ctx)


def select_rows(
    scores: torch.Tensor, budget: int, keys: torch.Tensor, values: torch.Tensor, allocator: Allocator,
    selector: Selector,
) -> LayerSelection:
    """The rows a layer keeps under ``budget`` per KV head: ``keys``/``values`` ``[batch, kv_heads, L, dim]`` are
    the candidate rows ``scores`` ``[batch, kv_heads, L]`` rate. The allocator splits the budget over the heads,
    unless the selector decides the counts itself (``threshold``: at most ``budget``). The protected mask is
    computed once and serves the allocator and the selector alike."""
    protected = selector.checked_protected_mask(scores.shape[-1], budget, scores.device)
    if selector.decides_counts:
        counts = selector.head_counts(scores, protected, budget)
    else:
        counts = allocator.head_budgets(scores, budget, protected)
    return select_counts(scores, counts, budget, keys, values, selector)


def select_counts(
    scores: torch.Tensor, counts: torch.Tensor, budget: int, keys: torch.Tensor, values: torch.Tensor,
    selector: Selector,
) -> LayerSelection:
    """Kept rows for ``counts`` ``[batch, kv_heads]`` tokens per head: dense when all are ``budget``."""
    if bool((counts == budget).all()):
        kept = selector.select(scores, budget)
        check_kept(kept, scores.shape, budget, type(selector).__name__)
        index = kept.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
        return LayerSelection(kept, keys.gather(2, index), values.gather(2, index))
    kept, key_parts, value_parts = [], [], []
    for b in range(scores.shape[0]):
        kept_row, key_row, value_row = [], [], []
        for h in range(scores.shape[1]):
            count = int(counts[b, h])
            one = scores[b : b + 1, h : h + 1]
            index = selector.select(one, count)
            check_kept(index, one.shape, count, type(selector).__name__)
            kept_row.append(index[0, 0])
            key_row.append(keys[b, h, index[0, 0]])
            value_row.append(values[b, h, index[0, 0]])
        kept.append(kept_row)
        key_parts.append(key_row)
        value_parts.append(value_row)
    return LayerSelection(kept, key_parts, value_parts)


def keep_all(keys: torch.Tensor, values: torch.Tensor, length: int) -> LayerSelection:
    """Every one of the first ``length`` rows, in order (a layer whose budget holds them all)."""
    kept = torch.arange(length, device=keys.device).expand(keys.shape[0], keys.shape[1], length)
    return LayerSelection(kept, keys[:, :, :length], values[:, :, :length])


def check_kept(kept: torch.Tensor, score_shape: torch.Size, budget: int, selector: str) -> None:
    """Refuse a selector's answer that is not ``budget`` indices per head inside the scored rows."""
    batch, heads, length = score_shape
    if kept.shape != (batch, heads, budget):
        raise RuntimeError(
            f"{selector} returned kept indices of shape {tuple(kept.shape)}, expected {(batch, heads, budget)}"
        )
    if not kept.numel():
        return
    low, high = torch.aminmax(kept)
    if low < 0 or high >= length:
        raise RuntimeError(f"{selector} returned indices outside [0, {length})")
