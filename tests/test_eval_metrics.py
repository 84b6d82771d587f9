"""Every metric against a case small enough to compute by hand."""

from __future__ import annotations

import math

import pytest
import torch

from kvpress_like.eval import metrics
from kvpress_like.eval.capture import QueryCapture
from kvpress_like.eval.toy import toy_model


def test_wilson_interval_hand_case():
    # p = 0.8, n = 10, z = 1.96: centre (0.8 + 0.1921) / 1.3842, half 1.96 * sqrt(0.016 + 0.0096) / 1.3842
    low, high = metrics.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert metrics.wilson_interval(0, 5)[0] == 0.0 and metrics.wilson_interval(5, 5)[1] == 1.0
    assert metrics.wilson_interval(5, 5)[0] == pytest.approx(0.5655, abs=1e-4)
    assert all(math.isnan(v) for v in metrics.wilson_interval(0, 0))


def test_accuracy_and_retention():
    assert metrics.accuracy([True, False, True, True]) == 0.75
    assert math.isnan(metrics.accuracy([]))
    assert metrics.retention(0.5, 0.8) == pytest.approx(0.625)
    assert math.isnan(metrics.retention(0.5, 0.0))


def test_b95_needs_every_larger_budget_to_hold():
    budgets = [0.03, 0.05, 0.10, 0.20, 0.40]
    assert metrics.b95(budgets, [0.5, 0.96, 0.90, 0.97, 1.0]) == 0.20  # 5% passes alone, 10% fails
    assert metrics.b95(budgets, [0.95, 0.96, 1.0, 1.0, 1.0]) == 0.03
    assert metrics.b95(budgets, [1.0, 1.0, 1.0, 1.0, 0.9]) is None
    assert metrics.b95([0.2, 0.1], [1.0, float("nan")]) == 0.2  # unsorted input; nan fails


def test_token_match_rate():
    assert metrics.token_match_rate([1, 2, 3], [1, 5, 3, 4]) == 0.5
    assert metrics.token_match_rate([1, 2, 3, 4, 5], [1, 2]) == 1.0
    assert metrics.token_match_rate([], []) == 1.0
    assert metrics.token_match_rate([7], []) == 0.0


def test_kl_divergence_hand_case():
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64))
    other = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]], dtype=torch.float64))
    kl = metrics.kl_divergence(ref, other)
    assert kl[0].item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-9)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-9)
    assert metrics.kl_divergence(ref + 3.0, other - 1.0)[0].item() == pytest.approx(kl[0].item())  # shift-invariant


def test_attention_mass_hand_case():
    # one head, d = 1; keys 1, 0, 2 at rows 0, 1, 2; a query of value 1 at row 1 and one at row 2.
    keys = torch.tensor([1.0, 0.0, 2.0]).view(1, 1, 3, 1)
    queries = torch.tensor([1.0, 1.0]).view(1, 1, 2, 1)
    mass = metrics.attention_mass(queries, keys, torch.tensor([1, 2]), scaling=1.0, prefix=2)
    e = math.e
    row1 = [e / (e + 1), 1 / (e + 1)]  # sees keys 0, 1
    row2 = [e / (e + 1 + e * e), 1 / (e + 1 + e * e)]  # sees all three; prefix keeps the first two
    assert mass.shape == (1, 1, 1, 2)
    assert mass[0, 0, 0].tolist() == pytest.approx([row1[0] + row2[0], row1[1] + row2[1]], abs=1e-6)


def test_attention_mass_groups_query_heads_by_kv_head():
    keys = torch.randn(1, 2, 5, 4)
    queries = torch.randn(1, 4, 3, 4)  # heads 0, 1 read kv head 0; heads 2, 3 read kv head 1
    mass = metrics.attention_mass(queries, keys, torch.tensor([2, 3, 4]), scaling=0.5, prefix=5)
    for head in range(4):
        kv = head // 2
        logits = queries[0, head] @ keys[0, kv].T * 0.5
        logits = logits.masked_fill(torch.arange(5)[None] > torch.tensor([2, 3, 4])[:, None], float("-inf"))
        assert torch.allclose(mass[0, kv, head % 2], logits.softmax(-1).sum(0), atol=1e-6)


def test_attention_recall_hand_case():
    mass = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]])  # one kv head, two query heads
    kept = torch.tensor([[1, 3]])
    # head 0: (2 + 4) / 10; head 1: (3 + 1) / 10; mean 0.5
    assert metrics.attention_recall(mass, kept) == pytest.approx(0.5)
    mask = torch.tensor([[False, True, False, True]])
    assert metrics.attention_recall(mass, mask) == pytest.approx(0.5)
    assert metrics.attention_recall(mass, torch.ones(1, 4, dtype=torch.bool)) == pytest.approx(1.0)


def test_attention_similarity_hand_case():
    assert metrics.attention_similarity(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(
        1 / math.sqrt(2)
    )
    window, true = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    two_heads = metrics.attention_similarity(window, true)
    assert two_heads == pytest.approx(0.5)  # cosines 1 and 0


def test_topk_recall_hand_case():
    true = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    window = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert metrics.topk_recall(true, window, 2) == pytest.approx(0.5)  # {0, 1} vs {1, 2}
    assert metrics.topk_recall(true, window, 4) == 1.0
    assert metrics.topk_recall(true, true, 1) == 1.0


def test_query_cosine_hand_case():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    assert metrics.query_cosine(a, b) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)


def test_captured_attention_equals_the_models_own_attention_weights():
    model = toy_model(seed=1)
    model.config._attn_implementation = "eager"
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([5, 9, 11])
    with torch.no_grad(), QueryCapture(model, prefix=8, rows=rows, keep_queries=True) as capture:
        out = model(input_ids=ids, output_attentions=True, use_cache=True)
    for layer, weights in enumerate(out.attentions):  # [1, q_heads, T, T]
        expected = weights[0, :, rows, :8].sum(1).view(2, 2, 8)  # q heads 0,1 -> kv 0; 2,3 -> kv 1
        assert torch.allclose(capture.mass[layer][0], expected, atol=1e-5)
        assert capture.stacked(layer).shape == (1, 4, 3, 16)


def test_exact_mcnemar_hand_cases():
    from kvpress_like.eval.summary import mcnemar_p

    assert mcnemar_p(5, 0) == pytest.approx(2 / 32)  # all 5 discordant pairs one way: 2 * 0.5^5
    assert mcnemar_p(6, 0) == pytest.approx(2 / 64)
    assert mcnemar_p(1, 2) == 1.0 and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
