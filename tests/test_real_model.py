"""The embedded SmolLM2-135M-Instruct: compression with a budget >= L is lossless, a small budget shrinks the cache."""

from __future__ import annotations

import pytest
from conftest import NEEDS_SMOLLM2

from kvpress_like import build
from kvpress_like.compat import cache_kwarg
from kvpress_like.eval.tasks import single_needle
from kvpress_like.prompting import build_prompt

pytestmark = [pytest.mark.model, NEEDS_SMOLLM2]


@pytest.fixture(scope="module")
def sample(smollm2):
    return single_needle(smollm2[1], context_tokens=300, depth=0.5, seed=0)


@pytest.fixture(scope="module")
def full_answer(smollm2, sample):
    model, tokenizer = smollm2
    ids = build_prompt(tokenizer, sample.context, sample.question).input_ids
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_full_budget_reproduces_uncompressed_answer(smollm2, sample, full_answer):
    model, tokenizer = smollm2
    pipeline = build("dapq", budget="100%")
    answer = pipeline.generate(model, tokenizer, sample.context, sample.question, max_new_tokens=16)
    assert answer == full_answer
    assert sample.is_correct(full_answer), "the embedded model should find a needle in 300 tokens"


def test_small_budget_shrinks_the_cache_and_transformers_continues_it_alike(smollm2, sample):
    """Our decode loop and ``model.generate`` read the same compressed cache the same way (query-agnostic:
    the question is fed after the compressed context, several tokens at once)."""
    model, tokenizer = smollm2
    pipeline = build("dapq", budget=64)
    answer = pipeline.generate(model, tokenizer, sample.context, sample.question, question_aware=False,
                               max_new_tokens=8, stop_at_eos=False)
    report = pipeline.last_report
    prompt = build_prompt(tokenizer, sample.context, sample.question)
    context = prompt.input_ids[:, : prompt.context_length]
    cache = build("dapq", budget=64).prefill(model, context).cache
    out = model.generate(prompt.input_ids, max_new_tokens=8, do_sample=False, **{cache_kwarg(model): cache})
    assert answer == tokenizer.decode(out[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
    assert report.budget == 64
    assert all(kept.shape[-1] == 64 for kept in report.kept_indices.values())
    assert len(report.layers) == model.config.num_hidden_layers
    assert report.cache_bytes_after < report.cache_bytes_before / 3
