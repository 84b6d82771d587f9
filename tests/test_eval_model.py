"""The harness on the embedded SmolLM2-135M-Instruct, at tiny settings (one short sample each)."""

from __future__ import annotations

import pytest
from conftest import NEEDS_SMOLLM2

from kvpress_like import build
from kvpress_like.eval.engine import Candidate, evaluate_sample
from kvpress_like.eval.probe import ProbeSettings, probe_sample
from kvpress_like.eval.tasks import single_needle

pytestmark = [pytest.mark.model, NEEDS_SMOLLM2]


def test_needle_with_answer_prefix_full_budget_reproduces_the_reference(smollm2):
    model, tokenizer = smollm2
    sample = single_needle(tokenizer, 300, 0.5, 0)
    candidates = [Candidate("dapq", b, build("dapq", budget=b)) for b in ("100%", "25%")]
    result = evaluate_sample(model, tokenizer, sample, "question_aware", candidates)
    assert result.reference["correct"], result.reference["answer"]
    assert result.reference["answer_tokens"] <= sample.max_new_tokens
    full, small = result.rows
    assert full["answer"] == result.reference["answer"] and full["kl"] < 1e-4 and full["recall"] == 1.0
    assert small["recall"] < 1.0 and small["similarity"] > 0.5


def test_probe_sample_sanity_on_the_real_model(smollm2):
    model, tokenizer = smollm2
    settings = ProbeSettings(length=256, samples=1, n_true=16, window_sizes=(8, 32), budgets=("10%",))
    result = probe_sample(model, tokenizer, settings, 0)
    table1 = result["table1"]
    assert table1["SC&DP"]["pre"][0] == pytest.approx(1.0, abs=1e-5)  # layer 0, before RoPE: same tokens
    assert table1["DC&SP"]["post"] == pytest.approx(table1["DC&SP"]["pre"], abs=1e-5)
    assert len(table1["SC&DP"]["post"]) == model.config.num_hidden_layers
    assert set(result["windows"]) >= {"pseudo/32", "semantic/32", "suffix/32", "question/all"}
