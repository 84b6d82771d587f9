"""CriticalKV's two-stage selection lives in the ``critical`` selector; the ``critical`` scorer never sees the
budget and hands over two scores per key as one complex tensor (real: the score, imaginary: first stage)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from kvpress_like import build, prefill_many
from kvpress_like.compat import model_inputs
from kvpress_like.parts import LayerContext
from kvpress_like.plugins import get_adapter
from kvpress_like.scorers.attention import AttentionConfig, attention_scores
from kvpress_like.scorers.critical import CriticalScorer, projected_value_norm
from kvpress_like.selection import CriticalConfig, CriticalSelector, TopKSelector

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def naive_two_stage(weighted: list[float], first_stage: list[float], budget: int, ratio: float, recent: int):
    """Plain-Python CriticalKV for one head: protected tokens, then the first stage, then the weighted scores."""
    length = len(weighted)
    kept = set(range(length - recent, length))
    first = sorted(range(length), key=lambda j: -first_stage[j])[: round(ratio * budget)]
    for j in sorted(first, key=lambda j: -first_stage[j]):
        if len(kept) < budget:
            kept.add(j)
    for j in sorted(range(length), key=lambda j: -weighted[j]):
        if len(kept) < budget:
            kept.add(j)
    return sorted(kept)


def test_a_hand_made_case():
    real = torch.tensor([[[0.0, 1, 2, 3, 4, 5]]])
    first_stage = torch.tensor([[[5.0, 4, 3, 2, 1, 0]]])
    scores = torch.complex(real, first_stage)
    select = CriticalSelector(CriticalConfig(first_stage_ratio=0.5)).select
    assert select(scores, 4).tolist() == [[[0, 1, 4, 5]]]  # 2 by the first stage, 2 by the real part
    assert CriticalSelector(CriticalConfig(first_stage_ratio=0.0)).select(scores, 4).tolist() == [[[2, 3, 4, 5]]]
    assert CriticalSelector(CriticalConfig(first_stage_ratio=1.0)).select(scores, 4).tolist() == [[[0, 1, 2, 3]]]
    # real scores are their own first stage, and any other selector ranks by the real part
    assert select(real, 4).tolist() == TopKSelector().select(scores, 4).tolist() == [[[2, 3, 4, 5]]]


@settings(max_examples=100, deadline=None)
@given(length=st.integers(4, 60), ratio=st.floats(0, 1), recent=st.integers(0, 4), data=st.data())
def test_two_stage_selection_matches_naive_reference(length, ratio, recent, data):
    budget = data.draw(st.integers(max(recent, 1), length))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    weighted, first_stage = torch.rand(2, 2, 3, length, generator=generator)
    kept = CriticalSelector(CriticalConfig(first_stage_ratio=ratio, recent=recent)).select(
        torch.complex(weighted, first_stage), budget
    )
    for b in range(2):
        for h in range(3):
            expected = naive_two_stage(weighted[b, h].tolist(), first_stage[b, h].tolist(), budget, ratio, recent)
            assert kept[b, h].tolist() == expected


def layer_context(model, length: int) -> LayerContext:
    """Layer 0 of ``model`` on a random prompt, its last 8 rows as the window (SnapKV's)."""
    adapter = get_adapter(model)
    module = adapter.attention_modules()[0]
    captured = {}
    handle = module.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            model(**model_inputs(model, cache, input_ids=random_ids(length)))
    finally:
        handle.remove()
    rows = torch.arange(length - 8, length)
    cos, sin = captured["position_embeddings"]
    queries = adapter.window_queries(module, captured["hidden_states"][:, rows], cos[:, rows], sin[:, rows])
    layer = cache.layers[0]
    return LayerContext(layer_idx=0, module=module, queries=queries, keys=layer.keys, values=layer.values,
                        query_rows=rows, prompt_length=length, scaling=module.scaling,
                        hidden_states=None, rope_at=None)


def test_the_scorer_returns_weighted_scores_and_plain_attention_and_never_reads_the_budget():
    ctx = layer_context(tiny_model("llama"), 40)  # a LayerContext holds no budget to read
    scores = CriticalScorer(AttentionConfig(pooling="avg")).score(ctx)
    attention = attention_scores(ctx, AttentionConfig(pooling="avg"))
    assert scores.dtype == torch.complex64 and scores.shape == (1, 2, 40)
    assert torch.equal(scores.imag, attention)
    assert torch.equal(scores.real, attention * projected_value_norm(ctx))


def test_one_scoring_serves_every_budget():
    model, ids = tiny_model("qwen2"), random_ids(80, batch=2)
    pipelines = [build("critical_dapq", budget=budget) for budget in (10, 25, 40)]
    shared = prefill_many(model, ids, pipelines)
    for pipeline, result in zip(pipelines, shared, strict=True):
        alone = pipeline.prefill(model, ids).report.kept_indices
        assert all(torch.equal(result.report.kept_indices[i], alone[i]) for i in alone)


def test_critical_methods_pair_the_scorer_with_the_selector():
    pipeline = build("critical_snapkv", budget=64)
    assert pipeline.config["scorer"]["name"] == pipeline.config["selector"]["name"] == "critical"
    assert pipeline.config["selector"]["first_stage_ratio"] == 0.5
    assert pipeline.config["selector"]["recent"] == build("snapkv", budget=64).config["selector"]["recent"]
    assert "first_stage_ratio" not in pipeline.config["scorer"]


def test_another_selector_ranks_by_the_weighted_scores_alone():
    model, ids = tiny_model("llama"), random_ids(60)
    topk = build("critical_dapq", budget=12, selector="topk").prefill(model, ids).report.kept_indices
    one_stage = build("critical_dapq", budget=12, selector={"first_stage_ratio": 0.0}).prefill(model, ids)
    two_stage = build("critical_dapq", budget=12).prefill(model, ids).report.kept_indices
    assert all(torch.equal(topk[i], one_stage.report.kept_indices[i]) for i in topk)
    assert any(not torch.equal(topk[i], two_stage[i]) for i in topk)


def test_projected_value_norms_are_computed_in_row_blocks_with_the_same_result():
    """Values are projected ``ROWS_AT_A_TIME`` rows at a time: the norms equal one projection of every row."""
    ctx = layer_context(tiny_model("llama"), 2600)
    weight = ctx.module.o_proj.weight.float()
    kv_heads, head_dim = ctx.values.shape[1], ctx.values.shape[3]
    per_head = weight.T.reshape(kv_heads, -1, head_dim, weight.shape[0])
    whole = torch.einsum("bkld,kgdh->bkglh", ctx.values.float(), per_head).abs().sum(-1).mean(dim=2)
    torch.testing.assert_close(projected_value_norm(ctx), whole)
