"""Tests of the example plugin, run against an installed kvpress_like and an installed plugin."""

from __future__ import annotations

import torch
from kvpress_like_example_plugin.plugin import PeakAttentionScorer
from transformers import LlamaConfig, LlamaForCausalLM

from kvpress_like import build, list_parts
from kvpress_like.parts import LayerContext


def context(queries, keys, query_rows, prompt_length):
    return LayerContext(layer_idx=0, module=None, queries=queries, keys=keys, values=torch.zeros_like(keys),
                        query_rows=query_rows, prompt_length=prompt_length, scaling=keys.shape[-1] ** -0.5,
                        budget=4, hidden_states=torch.zeros(1, len(query_rows), 8), rope_at=None)


def test_one_score_per_prompt_key_and_kv_head():
    ctx = context(torch.randn(2, 4, 3, 8), torch.randn(2, 2, 13, 8), torch.arange(10, 13), prompt_length=10)
    scores = PeakAttentionScorer().score(ctx)
    assert scores.shape == (2, 2, 10)
    assert bool((scores >= 0).all()) and bool((scores <= 1).all())


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
