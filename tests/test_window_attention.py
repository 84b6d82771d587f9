"""``window_attention`` against a naive reference: one query at a time, its visible keys, a plain softmax.

The scorer masks only the columns that some query cannot see (from the earliest query's next row on);
the reference builds every query's row of visible keys from scratch, so windows of any shape are covered:
suffix windows, appended windows, rows out of order, rows repeated, and both softmax domains.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_like.parts import LayerContext
from kvpress_like.scorers.attention import window_attention


def naive_window_attention(queries, keys, query_rows, prompt_length, scaling, domain):
    """``[batch, kv_heads, group, window, prompt_length]`` probabilities, one query row at a time."""
    batch, q_heads, window, _ = queries.shape
    kv_heads = keys.shape[1]
    group = q_heads // kv_heads
    out = torch.zeros(batch, kv_heads, group, window, prompt_length, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            for w, row in enumerate(query_rows.tolist()):
                seen = row + 1 if domain == "visible" else min(row + 1, prompt_length)
                logits = keys[b, h // group, :seen].double() @ queries[b, h, w].double() * scaling
                probs = logits.softmax(dim=0)[:prompt_length]
                out[b, h // group, h % group, w, : probs.shape[0]] = probs
    return out


@settings(max_examples=60, deadline=None)
@given(
    prompt_length=st.integers(1, 24),
    appended=st.integers(0, 6),
    rows=st.lists(st.integers(0, 29), min_size=0, max_size=8),
    group=st.sampled_from([1, 2, 3]),
    domain=st.sampled_from(["visible", "prompt"]),
    seed=st.integers(0, 99),
)
def test_window_attention_matches_one_query_at_a_time(prompt_length, appended, rows, group, domain, seed):
    total = prompt_length + appended
    query_rows = torch.tensor([r % total for r in rows], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    kv_heads = 2
    queries = torch.randn(1, kv_heads * group, len(rows), 4, generator=generator, dtype=torch.float64)
    keys = torch.randn(1, kv_heads, total, 4, generator=generator, dtype=torch.float64)
    ctx = LayerContext(
        layer_idx=0, module=None, queries=queries, keys=keys, values=keys, query_rows=query_rows,
        prompt_length=prompt_length, scaling=0.5, rope_at=None, hidden_states=None,
    )
    expected = naive_window_attention(queries, keys, query_rows, prompt_length, 0.5, domain)
    got = window_attention(ctx, domain)
    assert got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_a_query_sees_no_later_key():
    """The masked tail is where causality bites: a query of row 2 gives rows 3 and later nothing."""
    queries = torch.ones(1, 1, 1, 2, dtype=torch.float64)
    keys = torch.ones(1, 1, 6, 2, dtype=torch.float64)
    ctx = LayerContext(
        layer_idx=0, module=None, queries=queries, keys=keys, values=keys, query_rows=torch.tensor([2]),
        prompt_length=6, scaling=1.0, rope_at=None, hidden_states=None,
    )
    probs = window_attention(ctx)[0, 0, 0, 0]
    assert probs.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0, 0, 0])
