"""The chunk selector: whole chunks, exact budget, protected tokens kept, equal to a naive reference."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_like import build
from kvpress_like.selection import ChunkConfig, ChunkSelector
from kvpress_like.testing import make_model


def naive_chunk_selection(scores: list[float], budget: int, size: int, sinks: int, recent: int, align_end: bool):
    """Plain-Python ChunkKV selection for one head (mean aggregation)."""
    length = len(scores)
    protected = {i for i in range(length) if i < sinks or i >= length - recent}
    shift = (-length) % size if align_end else 0
    chunks: dict[int, list[int]] = {}
    for i in range(length):
        if i not in protected:
            chunks.setdefault((i + shift) // size, []).append(i)
    ranked = sorted(chunks.values(), key=lambda toks: -sum(scores[t] for t in toks) / len(toks))
    kept = set(protected)
    for tokens in ranked:
        room = budget - len(kept)
        if room <= 0:
            break
        kept |= set(sorted(tokens, key=lambda t: -scores[t])[:room])
    return sorted(kept)


@settings(max_examples=200, deadline=None)
@given(
    length=st.integers(5, 90),
    size=st.integers(1, 12),
    sinks=st.integers(0, 3),
    recent=st.integers(0, 6),
    align_end=st.booleans(),
    data=st.data(),
)
def test_chunk_selection_matches_naive_reference(length, size, sinks, recent, align_end, data):
    protected = len({i for i in range(length) if i < sinks or i >= length - recent})
    budget = data.draw(st.integers(max(protected, 1), length))
    seed = data.draw(st.integers(0, 10_000))
    scores = torch.rand(2, 3, length, generator=torch.Generator().manual_seed(seed))
    selector = ChunkSelector(
        ChunkConfig(chunk_size=size, sinks=sinks, recent=recent, alignment="end" if align_end else "start")
    )
    kept = selector.select(scores, budget)
    assert kept.shape == (2, 3, budget)
    for b in range(2):
        for h in range(3):
            expected = naive_chunk_selection(scores[b, h].tolist(), budget, size, sinks, recent, align_end)
            assert kept[b, h].tolist() == expected


@settings(max_examples=40, deadline=None)
@given(length=st.integers(20, 120), size=st.integers(2, 16), data=st.data())
def test_at_most_one_chunk_is_partly_kept(length, size, data):
    budget = data.draw(st.integers(1, length))
    scores = torch.rand(1, 2, length, generator=torch.Generator().manual_seed(length * size))
    selector = ChunkSelector(ChunkConfig(chunk_size=size))
    kept = selector.select(scores, budget)
    ids = selector.chunk_ids(length, kept.device)
    for h in range(2):
        chosen = torch.zeros(length, dtype=torch.bool)
        chosen[kept[0, h]] = True
        partial = [c for c in range(int(ids[-1]) + 1) if 0 < int(chosen[ids == c].sum()) < int((ids == c).sum())]
        assert len(partial) <= 1


def test_chunk_methods_keep_their_window_and_budget():
    model = make_model("llama")
    ids = torch.randint(0, 256, (1, 120), generator=torch.Generator().manual_seed(0))
    report = build("snapkv_chunk", budget=60).prefill(model, ids).report
    for kept in report.kept_indices.values():
        assert kept.shape[-1] == 60
        assert set(range(88, 120)) <= set(kept[0, 0].tolist())  # SnapKV's 32-token window
    report = build("dapq_chunk", budget=48).prefill(model, ids).report
    assert all(kept.shape[-1] == 48 for kept in report.kept_indices.values())
