"""The ``segments`` selector (kvpress's ChunkPress: the same share of every prompt segment) against a naive
reference on random scores, and through a prefill."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_ids, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpress_like import build
from kvpress_like.errors import ConfigError
from kvpress_like.selection import SegmentSelector

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def segments_reference(scores: list[float], budget: int, size: int, protected: set[int]) -> set[int]:
    """Protected tokens, then each segment's best unprotected tokens: the spare budget split in proportion to
    each segment's unprotected tokens, floors first, the rest one each to the largest fractional parts."""
    length = len(scores)
    segments = [[j for j in range(s, min(s + size, length)) if j not in protected] for s in range(0, length, size)]
    spare, free = budget - len(protected), sum(len(seg) for seg in segments)
    exact = [spare * len(seg) / free if free else 0.0 for seg in segments]
    shares = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - shares[i], reverse=True)[: spare - sum(shares)]:
        shares[i] += 1
    kept = set(protected)
    for seg, share in zip(segments, shares, strict=True):
        kept |= set(sorted(seg, key=lambda j: -scores[j])[:share])
    return kept


@SETTINGS
@given(data=st.data(), length=st.integers(1, 90), size=st.integers(1, 40), sinks=st.integers(0, 5),
       recent=st.integers(0, 5))
def test_segments_match_the_reference(data, length, size, sinks, recent):
    protected = {j for j in range(length) if j < sinks or j >= length - recent}
    budget = data.draw(st.integers(len(protected), length))
    selector = SegmentSelector(SegmentSelector.Config(segment_size=size, sinks=sinks, recent=recent))
    scores = torch.randperm(2 * length, generator=torch.Generator().manual_seed(length))[:length].float()  # no ties
    scores = scores.view(1, 1, -1).expand(2, 3, -1) * torch.tensor([1.0, -1.0, 0.5]).view(1, 3, 1)
    kept = selector.select(scores, budget)
    assert kept.shape == (2, 3, budget)
    for b in range(2):
        for h in range(3):
            row = kept[b, h].tolist()
            assert row == sorted(set(row)), "kept indices must be sorted and unique"
            assert set(row) == segments_reference(scores[b, h].tolist(), budget, size, protected)


def test_every_segment_keeps_its_share_in_a_prefill():
    model, ids = tiny_model("llama"), random_ids(100, seed=4)
    result = build("knorm", budget=30, selector={"name": "segments", "segment_size": 32}).prefill(model, ids)
    for layer in result.report.layers.values():
        counts = torch.stack([(layer.kept_indices // 32 == n).sum(-1) for n in range(4)], dim=-1)
        assert (counts == torch.tensor([10, 10, 9, 1])).all()  # 9.6, 9.6, 9.6, 1.2 → largest remainders


def test_protected_tokens_beyond_the_budget_are_refused():
    pipeline = build("knorm", budget=3, selector={"name": "segments", "sinks": 4})
    with pytest.raises(ConfigError, match="4 protected tokens"):
        pipeline.prefill(tiny_model("llama"), random_ids(50))
