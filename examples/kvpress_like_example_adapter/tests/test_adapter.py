"""Tests of the example adapter, run against an installed kvpress_like and an installed plugin."""

from __future__ import annotations

import torch
from kvpress_like_example_adapter.adapter import Olmo2Adapter

from kvpress_like import ModelAdapter, build
from kvpress_like.plugins import get_adapter
from kvpress_like.testing import attention_mismatch, make_model


def test_recomputed_queries_give_the_model_own_attention():
    assert attention_mismatch("olmo2") < 1e-5
    # Llama's projection (no query norm) would not: the override is what makes OLMo 2 work
    assert attention_mismatch("olmo2", adapter=ModelAdapter) > 1e-2


def test_an_olmo2_model_gets_this_adapter_and_compresses():
    model = make_model("olmo2")
    assert type(model).__name__ == "Olmo2ForCausalLM" and isinstance(get_adapter(model), Olmo2Adapter)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    result = build("dapq", budget=16).prefill(model, ids)
    assert sorted(result.report.layers) == [0, 1]
    assert all(kept.shape == (1, 2, 16) for kept in result.report.kept_indices.values())
    assert result.cache.get_seq_length(0) == 64 and result.cache.physical_length(0) == 16
