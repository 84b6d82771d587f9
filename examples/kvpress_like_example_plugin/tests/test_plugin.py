"""Tests of the example plugin, run against an installed kvpress_like and an installed plugin."""

from __future__ import annotations

import pytest
import torch
from kvpress_like_example_plugin.plugin import PeakAttentionConfig, PeakAttentionScorer
from transformers import LlamaConfig, LlamaForCausalLM

from kvpress_like import build, list_parts
from kvpress_like.parts import LayerContext


def context(queries, keys, query_rows, prompt_length):
    return LayerContext(layer_idx=0, module=None, queries=queries, keys=keys, values=torch.zeros_like(keys),
                        query_rows=query_rows, prompt_length=prompt_length, scaling=keys.shape[-1] ** -0.5,
                        hidden_states=torch.zeros(1, len(query_rows), 8), rope_at=None)


def naive_peak(ctx, temperature: float, gqa: str) -> torch.Tensor:
    """Query head by query head, query by query: softmax over the keys it sees, the peak on each prompt key."""
    batch, q_heads, window, _ = ctx.queries.shape
    group = q_heads // ctx.keys.shape[1]
    peaks = torch.zeros(batch, q_heads, ctx.prompt_length)
    for b in range(batch):
        for h in range(q_heads):
            for w in range(window):
                seen = ctx.keys[b, h // group, : int(ctx.query_rows[w]) + 1]
                probs = (seen @ ctx.queries[b, h, w] * ctx.scaling / temperature).softmax(dim=0)
                peaks[b, h, : len(probs)] = torch.maximum(peaks[b, h, : len(probs)], probs[: ctx.prompt_length])
    grouped = peaks.reshape(batch, -1, group, ctx.prompt_length)
    return grouped.mean(dim=2) if gqa == "mean" else grouped.amax(dim=2)


@pytest.mark.parametrize(("gqa", "temperature"), [("max", 1.0), ("mean", 2.5)])
def test_scores_match_a_naive_reference(gqa, temperature):
    ctx = context(torch.randn(2, 4, 3, 8), torch.randn(2, 2, 13, 8), torch.arange(10, 13), prompt_length=10)
    scores = PeakAttentionScorer(PeakAttentionConfig(gqa=gqa, temperature=temperature)).score(ctx)
    assert scores.shape == (2, 2, 10)
    assert torch.allclose(scores, naive_peak(ctx, temperature, gqa), atol=1e-6)


def test_queries_never_see_later_keys():
    # One query at row 0: under the causal mask it sees only key 0, which gets all of its attention.
    ctx = context(torch.randn(1, 2, 1, 8), torch.randn(1, 1, 6, 8), torch.tensor([0]), prompt_length=6)
    scores = PeakAttentionScorer().score(ctx)
    assert torch.allclose(scores[0, 0], torch.tensor([1.0, 0, 0, 0, 0, 0]))


def test_the_method_is_registered_and_compresses():
    assert "example_dapq_peak" in {method["name"] for method in list_parts()["method"]}
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 40))
    report = build("example_dapq_peak", budget=8).prefill(model, ids).report
    assert all(kept.shape == (1, 2, 8) and int(kept.max()) < 40 for kept in report.kept_indices.values())
