"""The embedded SmolLM2-135M-Instruct: compression with a budget >= L is lossless, a small budget shrinks the cache."""

from __future__ import annotations

import pytest
from conftest import NEEDS_SMOLLM2

from kvpress_like import build
from kvpress_like.eval.tasks import single_needle

pytestmark = [pytest.mark.model, NEEDS_SMOLLM2]


@pytest.fixture(scope="module")
def sample(smollm2):
    return single_needle(smollm2[1], context_tokens=300, depth=0.5, seed=0)


@pytest.fixture(scope="module")
def full_answer(smollm2, sample):
    model, tokenizer = smollm2
    from kvpress_like.prompting import build_prompt

    ids = build_prompt(tokenizer, sample.context, sample.question).input_ids
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_full_budget_reproduces_uncompressed_answer(smollm2, sample, full_answer):
    model, tokenizer = smollm2
    pipeline = build("dapq", budget="100%")
    answer = pipeline.generate(model, tokenizer, sample.context, sample.question, max_new_tokens=16)
    assert answer == full_answer
    assert sample.is_correct(full_answer), "the embedded model should find a needle in 300 tokens"


def test_small_budget_runs_and_shrinks_cache(smollm2, sample):
    model, tokenizer = smollm2
    pipeline = build("dapq", budget=64)
    answer = pipeline.generate(model, tokenizer, sample.context, sample.question, max_new_tokens=8)
    report = pipeline.last_report
    assert isinstance(answer, str) and answer
    assert report.budget == 64
    assert all(kept.shape[-1] == 64 for kept in report.kept_indices.values())
    assert len(report.layers) == model.config.num_hidden_layers
    assert report.cache_bytes_after < report.cache_bytes_before / 3
