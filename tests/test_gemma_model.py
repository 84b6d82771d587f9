"""The embedded Gemma 3 270M, a hybrid base model (15 sliding-window layers of 512 tokens, 3 global layers).

The prompt (~1k tokens) is longer than the window, so the sliding layers really slide: compression must
leave them exactly as the uncompressed prefill has them and prune only the global layers; continuations
through our decode loop and through ``model.generate`` must agree, and a budget covering the prompt must
change nothing.
"""

from __future__ import annotations

import pytest
import torch
from conftest import NEEDS_GEMMA3, full_attention_layers, full_prefill

from kvpress_like import build
from kvpress_like.compat import cache_kwarg
from kvpress_like.eval.tasks import single_needle
from kvpress_like.pipeline import eos_ids
from kvpress_like.prompting import build_prompt

pytestmark = [pytest.mark.gemma, NEEDS_GEMMA3]

BUDGET = 64
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def sample(gemma3):
    return single_needle(gemma3[1], context_tokens=1000, depth=0.5, seed=0)


@pytest.fixture(scope="module")
def prompt(gemma3, sample):
    return build_prompt(gemma3[1], sample.context, sample.question)


@pytest.fixture(scope="module")
def full_cache(gemma3, prompt):
    """The uncompressed prefill's cache."""
    return full_prefill(gemma3[0], prompt.input_ids)[0]


@pytest.fixture(scope="module")
def compressed(gemma3, prompt):
    """A DapQ prefill (pseudo queries appended after the prompt) keeping ``BUDGET`` tokens per global layer."""
    return build("dapq", budget=BUDGET).prefill(gemma3[0], prompt.input_ids, question_span=prompt.question_span)


def greedy(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> list[int]:
    """``model.generate``'s greedy new tokens, stopping at the ids our decode loop stops at."""
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=sorted(eos_ids(model, tokenizer)), **kwargs,
    )
    return out[0, input_ids.shape[1] :].tolist()


def kv_bytes(cache, layers: list[int] | None = None) -> int:
    """Bytes of the key and value tensors of ``layers`` (default: every layer) of ``cache``."""
    chosen = [cache.layers[i] for i in layers] if layers is not None else cache.layers
    return sum(t.numel() * t.element_size() for layer in chosen for t in (layer.keys, layer.values))


def sliding_layers(model) -> list[int]:
    return [i for i in range(model.config.num_hidden_layers) if i not in full_attention_layers(model)]


def test_sliding_layers_untouched_and_global_layers_pruned_to_the_budget(gemma3, prompt, full_cache, compressed):
    model = gemma3[0]
    length = prompt.input_ids.shape[1]
    assert len(full_attention_layers(model)) == 3 and len(sliding_layers(model)) == 15
    assert length > model.config.sliding_window, "the prompt must be longer than the sliding window"

    report, cache = compressed.report, compressed.cache
    assert sorted(report.layers) == full_attention_layers(model)
    assert sorted(report.uncompressed_layers) == sliding_layers(model)
    for i in sliding_layers(model):
        assert full_cache.layers[i].keys.shape[-2] < length  # the window slid past the prompt's start
        for name in ("keys", "values"):
            expected = getattr(full_cache.layers[i], name)
            torch.testing.assert_close(getattr(cache.layers[i], name), expected, rtol=1e-4, atol=1e-4)
    for i in full_attention_layers(model):
        kept = report.layers[i].kept_indices
        assert kept.shape == (1, model.config.num_key_value_heads, BUDGET)
        rows = kept[..., None].expand(-1, -1, -1, model.config.head_dim)
        for name in ("keys", "values"):
            expected = getattr(full_cache.layers[i], name).gather(2, rows)  # the kept prompt rows, unchanged
            torch.testing.assert_close(getattr(cache.layers[i], name), expected, rtol=1e-4, atol=1e-4)
    assert all(cache.get_seq_length(i) == length for i in range(len(cache.layers)))


def test_decode_loop_and_model_generate_continue_alike(gemma3, sample, prompt):
    model, tokenizer = gemma3
    pipeline = build("dapq", budget=BUDGET)
    answer = pipeline.generate(model, tokenizer, sample.context, sample.question, max_new_tokens=NEW_TOKENS)
    assert answer.strip()

    ids = prompt.input_ids
    result = pipeline.prefill(model, ids, question_span=prompt.question_span)
    first = result.next_token_logits.argmax(-1, keepdim=True)
    rest = greedy(model, tokenizer, torch.cat([ids, first], 1), NEW_TOKENS - 1, **{cache_kwarg(model): result.cache})
    tokens = [int(first), *rest]
    assert tokenizer.decode(tokens, skip_special_tokens=True) == answer
    # generate fed only the new tokens: the global layers hold the budget plus what was decoded
    for i in full_attention_layers(model):
        assert result.cache.layers[i].keys.shape[-2] == BUDGET + len(tokens) - 1


def test_budget_covering_the_prompt_generates_like_the_uncompressed_model(gemma3, sample, prompt):
    model, tokenizer = gemma3
    length = prompt.input_ids.shape[1]
    expected = tokenizer.decode(greedy(model, tokenizer, prompt.input_ids, NEW_TOKENS), skip_special_tokens=True)
    pipeline = build("dapq", budget=length + 1)
    answer = pipeline.generate(model, tokenizer, sample.context, sample.question, max_new_tokens=NEW_TOKENS)
    assert answer == expected
    assert all(kept.shape[-1] == length for kept in pipeline.last_report.kept_indices.values())
    assert sample.is_correct(expected), f"the base model should find the needle after 'Answer:', got {expected!r}"


def test_report_bytes_cover_sliding_and_global_layers(gemma3, full_cache, compressed):
    model = gemma3[0]
    report, cache = compressed.report, compressed.cache
    assert report.cache_bytes_after == kv_bytes(cache)
    assert report.cache_bytes_before == kv_bytes(full_cache)
    per_token = 2 * model.config.num_key_value_heads * model.config.head_dim * cache.layers[0].keys.element_size()
    global_bytes = len(full_attention_layers(model)) * BUDGET * per_token
    assert report.cache_bytes_after == kv_bytes(full_cache, sliding_layers(model)) + global_bytes
    assert report.cache_bytes_after < report.cache_bytes_before
