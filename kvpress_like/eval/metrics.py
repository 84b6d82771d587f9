"""Metrics of the harness, as small pure functions on numbers and tensors.

* accuracy with a Wilson 95% interval, retention (method accuracy / full-cache accuracy on the same
  samples) and B95 (the smallest budget from which on retention stays at or above 95%);
* agreement with the full cache: token match rate of the greedy answers, KL divergence of the
  next-token distributions along the full-cache answer;
* attention recall: the share of the true decoding queries' attention mass (measured with the full
  cache) that falls on the kept prompt tokens, per layer;
* attention similarity (Tian et al. 2026, App. C.2, Table 8): cosine between the window's and the true
  decoding queries' attention distributions over the prompt;
* top-k recall of a window (the paper's Eq. 1–3, after LAQ++): |top-k(true) ∩ top-k(window)| / k;
* query cosine (the paper's Table 1): cosine between pseudo and true decoding queries, token by token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kvpress_like.parts import LayerContext
from kvpress_like.scorers.attention import window_attention


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% for the default ``z``); ``(nan, nan)`` if n = 0."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(correct: Sequence[bool]) -> float:
    """Share of correct answers; nan for no samples."""
    return sum(bool(c) for c in correct) / len(correct) if len(correct) else math.nan


def retention(method_accuracy: float, full_accuracy: float) -> float:
    """``method / full`` accuracy on the same samples; nan when the full cache gets nothing right."""
    if full_accuracy is None or math.isnan(full_accuracy) or full_accuracy == 0:
        return math.nan
    return method_accuracy / full_accuracy


def b95(budgets: Sequence[float], retentions: Sequence[float], threshold: float = 0.95) -> float | None:
    """Smallest budget from which on retention is ≥ ``threshold`` at every larger measured budget.

    Budgets are sorted first; a nan retention counts as failing. ``None`` when even the largest fails.
    (Requiring every larger budget too keeps one lucky small budget from defining B95.)
    """
    pairs = sorted(zip(budgets, retentions, strict=True))
    best = None
    for budget, value in reversed(pairs):
        if value is None or math.isnan(value) or value < threshold:
            break
        best = budget
    return best


def token_match_rate(predicted: Sequence[int], reference: Sequence[int]) -> float:
    """Share of the reference answer's tokens that the prediction reproduces at the same position."""
    if not reference:
        return 1.0 if not predicted else 0.0
    same = sum(1 for p, r in zip(predicted, reference, strict=False) if p == r)
    return same / len(reference)


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P_reference ‖ P) in nats for each row of ``[..., vocab]`` logits (computed in float64)."""
    ref = reference_logits.double().log_softmax(-1)
    other = logits.double().log_softmax(-1)
    return (ref.exp() * (ref - other)).sum(-1)


def attention_mass(
    queries: torch.Tensor, keys: torch.Tensor, query_rows: torch.Tensor, scaling: float, prefix: int
) -> torch.Tensor:
    """Causal softmax attention of ``queries`` summed over the query rows, on the first ``prefix`` keys.

    ``queries`` ``[batch, q_heads, rows, d]``, ``keys`` ``[batch, kv_heads, T, d]``, ``query_rows``
    ``[rows]`` (each query's own row in the key axis: it sees keys ``<= row``). Returns
    ``[batch, kv_heads, group, prefix]`` (group = q_heads / kv_heads), float32: the attention the
    scorers see (:func:`kvpress_like.window_attention`).
    """
    ctx = LayerContext(
        layer_idx=0, module=None, queries=queries, keys=keys, values=keys, query_rows=query_rows,
        prompt_length=prefix, scaling=scaling, hidden_states=None, rope_at=None,
    )
    return window_attention(ctx).sum(dim=3)


def attention_recall(mass: torch.Tensor, kept: torch.Tensor) -> float:
    """Share of the attention ``mass`` ``[kv_heads, group, L]`` on the kept tokens, averaged over query heads.

    ``kept`` is a bool mask ``[kv_heads, L]`` (or a LongTensor of kept indices ``[kv_heads, k]``). Each
    query head's share is ``mass[kept].sum() / mass.sum()``.
    """
    mask = _as_mask(kept, mass.shape[-1]).to(mass.device)
    on_kept = (mass * mask[:, None, :]).sum(-1)
    total = mass.sum(-1).clamp_min(1e-30)
    return float((on_kept / total).mean())


def attention_similarity(window: torch.Tensor, true: torch.Tensor) -> float:
    """Mean over heads of the cosine between two attention distributions ``[..., L]`` (scale-free)."""
    cos = torch.nn.functional.cosine_similarity(window.double(), true.double(), dim=-1)
    return float(cos.mean())


def topk_recall(true_scores: torch.Tensor, window_scores: torch.Tensor, k: int) -> float:
    """|top-k(true) ∩ top-k(window)| / k per row of ``[..., L]``, averaged (the paper's Recall_W)."""
    length = true_scores.shape[-1]
    k = min(k, length)
    gold = _as_mask(true_scores.topk(k, dim=-1).indices, length)
    pred = _as_mask(window_scores.topk(k, dim=-1).indices, length)
    return float(((gold & pred).sum(-1).double() / k).mean())


def query_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine between matching query vectors ``[..., tokens, d]`` (per head and token, then averaged)."""
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def _as_mask(kept: torch.Tensor, length: int) -> torch.Tensor:
    if kept.dtype == torch.bool:
        return kept
    mask = torch.zeros(*kept.shape[:-1], length, dtype=torch.bool, device=kept.device)
    return mask.scatter_(-1, kept.long(), True)
