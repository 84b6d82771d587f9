"""Every user-facing error: specific exception class, and a message that says what to do."""

from __future__ import annotations

import pytest
import torch
from conftest import make_gpt2, random_ids, tiny_model

from kvpress_like import (
    ConfigError,
    DuplicateRegistrationError,
    KVPressLikeError,
    UnknownNameError,
    UnsupportedInputError,
    UnsupportedModelError,
    build,
)
from kvpress_like.attention import restore_attention
from kvpress_like.selection import TopKSelector

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


CONTEXT = " ".join(f"w{i}" for i in range(60))


def test_error_hierarchy():
    """Callers can catch everything with KVPressLikeError, or by the builtin it refines."""
    assert issubclass(ConfigError, ValueError)
    assert issubclass(UnknownNameError, ConfigError) and issubclass(UnknownNameError, KeyError)
    assert issubclass(UnsupportedModelError, TypeError)
    assert issubclass(UnsupportedInputError, ValueError)
    for error in (ConfigError, UnknownNameError, UnsupportedModelError, UnsupportedInputError,
                  DuplicateRegistrationError):
        assert issubclass(error, KVPressLikeError)


# ----------------------------------------------------------------------------------------------
# models and inputs
# ----------------------------------------------------------------------------------------------


def test_unsupported_model_names_the_supported_architectures():
    model = make_gpt2()
    with pytest.raises(UnsupportedModelError) as info:
        build("dapq", budget=8).prefill(model, random_ids(20))
    message = str(info.value)
    assert "GPT2LMHeadModel" in message and "gpt2" in message
    for name in ("Llama", "Mistral", "Qwen2", "Qwen3", "Phi3", "Gemma3"):
        assert name in message.split("supported architectures:")[1]
    assert not any(m._forward_hooks for m in model.modules())


def test_right_padding_is_refused_with_the_convention_to_follow():
    ids = random_ids(12, batch=2)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding on the second row
    with pytest.raises(UnsupportedInputError, match="pad on the left"):
        build("dapq", budget=4).prefill(tiny_model("llama"), ids, attention_mask=mask)


def test_an_all_padding_row_is_refused():
    ids = random_ids(12, batch=3)
    mask = torch.ones_like(ids)
    mask[2] = 0
    with pytest.raises(UnsupportedInputError, match=r"rows \[2\] of attention_mask are all padding"):
        build("dapq", budget=4).prefill(tiny_model("llama"), ids, attention_mask=mask)


def test_a_short_sequence_whose_budget_cannot_hold_its_protected_tokens_is_named():
    ids = random_ids(60, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :50] = 0  # the second sequence has 10 tokens: 20% is 2 tokens, fewer than its 4 sinks
    with pytest.raises(ConfigError, match="protected") as raised:
        build("dapq", budget="20%", selector={"sinks": 4}).prefill(tiny_model("llama"), ids, attention_mask=mask)
    assert any("sequence 1 of the batch (10 tokens)" in note for note in raised.value.__notes__)


def test_padded_batch_question_spans_must_be_one_per_sequence():
    ids = random_ids(20, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with pytest.raises(UnsupportedInputError, match="list of 2"):
        build("dapq", budget=4, window="question").prefill(tiny_model("llama"), ids, attention_mask=mask,
                                                          question_span=(0, 3))


def test_all_ones_attention_mask_is_accepted():
    ids = random_ids(12, batch=2)
    result = build("dapq", budget=4).prefill(tiny_model("llama"), ids, attention_mask=torch.ones_like(ids))
    assert result.cache.get_seq_length() == 12


def test_attention_mask_of_the_wrong_shape():
    ids = random_ids(12)
    with pytest.raises(UnsupportedInputError, match=r"attention_mask shape \(1, 11\) differs from input_ids \(1, 12\)"):
        build("dapq", budget=4).prefill(tiny_model("llama"), ids, attention_mask=torch.ones(1, 11, dtype=torch.long))


@pytest.mark.parametrize(
    "bad_ids",
    [
        torch.randint(0, 256, (12,)),  # 1-D
        torch.randint(0, 256, (1, 12)).float(),  # not integer ids
        torch.randint(0, 256, (1, 12)).int(),  # int32
        [[1, 2, 3]],  # not a tensor
    ],
    ids=["1d", "float", "int32", "list"],
)
def test_input_ids_must_be_a_2d_long_tensor(bad_ids):
    with pytest.raises(UnsupportedInputError, match=r"LongTensor of shape \[batch, prompt_length\]"):
        build("dapq", budget=4).prefill(tiny_model("llama"), bad_ids)


def test_empty_prompt():
    with pytest.raises(UnsupportedInputError, match="at least one token"):
        build("dapq", budget=4).prefill(tiny_model("llama"), torch.zeros(1, 0, dtype=torch.long))


def test_question_window_without_question_span_says_how_to_pass_it():
    pipeline = build("dapq", budget=4, window="question")
    with pytest.raises(UnsupportedInputError) as info:
        pipeline.prefill(tiny_model("llama"), random_ids(20))
    assert "question_span=(start, end)" in str(info.value)
    # with the span it works
    result = pipeline.prefill(tiny_model("llama"), random_ids(20), question_span=(15, 20))
    assert all(k.shape[-1] == 4 for k in result.report.kept_indices.values())


@pytest.mark.parametrize("span", [(5, 5), (8, 3), (-1, 4), (10, 21)])
def test_question_span_outside_the_prompt(span):
    with pytest.raises(UnsupportedInputError, match=r"0 <= start < end <= prompt length \(20\)"):
        build("dapq", budget=4, window="question").prefill(tiny_model("llama"), random_ids(20), question_span=span)


@pytest.mark.parametrize(("sinks", "recent", "budget"), [(4, 8, 10), (0, 5, 4), (3, 0, 2)])
def test_protected_tokens_exceeding_the_budget(sinks, recent, budget):
    model = tiny_model("llama")
    pipeline = build("dapq", budget=budget, selector={"sinks": sinks, "recent": recent})
    with pytest.raises(ConfigError) as info:
        pipeline.prefill(model, random_ids(40))
    message = str(info.value)
    assert f"{sinks + recent} protected tokens" in message
    assert f"budget of {budget} tokens" in message
    assert "lower sinks/recent or raise the budget" in message
    assert not any(m._forward_hooks for m in model.modules())


def test_protected_tokens_that_fit_are_fine():
    pipeline = build("dapq", budget=12, selector={"sinks": 4, "recent": 8})
    report = pipeline.prefill(tiny_model("llama"), random_ids(40)).report
    for kept in report.kept_indices.values():
        assert torch.equal(kept, torch.tensor([0, 1, 2, 3, *range(32, 40)]).expand_as(kept))


def test_the_protected_mask_is_computed_once_per_length_budget_and_config_and_the_memo_stays_small(monkeypatch):
    selector = build("snapkv", budget=40).selector
    calls = []
    original = type(selector).protected_mask
    monkeypatch.setattr(type(selector), "protected_mask", lambda self, *a: calls.append(a) or original(self, *a))
    first = selector.checked_protected_mask(100, 40, "cpu")
    assert selector.checked_protected_mask(100, 40, "cpu") is first and len(calls) == 1
    assert int(first.sum()) == 32
    selector.config = selector.Config(recent=8)  # another config: another mask, not the memoised one
    assert int(selector.checked_protected_mask(100, 40, "cpu").sum()) == 8 and len(calls) == 2
    for length in range(200, 300):  # many lengths (a long evaluation): the memo is emptied, not grown
        assert int(selector.checked_protected_mask(length, 40, "cpu").sum()) == 8
    assert len(selector._protected_memo) <= 64


class _OutOfRange(TopKSelector):
    def select(self, scores, budget):
        return super().select(scores, budget) + scores.shape[-1]


class _WrongCount(TopKSelector):
    def select(self, scores, budget):
        return super().select(scores, budget)[..., :-1]


@pytest.mark.parametrize(("selector", "message"), [
    (_OutOfRange, "_OutOfRange returned indices outside \\[0, 40\\)"),
    (_WrongCount, "_WrongCount returned kept indices of shape \\(1, 2, 7\\), expected \\(1, 2, 8\\)"),
])
def test_a_selector_returning_impossible_indices_is_named_with_its_layer(selector, message):
    model = tiny_model("llama")
    pipeline = build("dapq", budget=8)
    pipeline.selector = selector()
    with pytest.raises(RuntimeError, match=message) as info:
        pipeline.prefill(model, random_ids(40))
    assert any("failed on layer 0" in note for note in info.value.__notes__)
    assert not any(m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------------------------------------
# configuration (more in test_config_and_registry.py)
# ----------------------------------------------------------------------------------------------


def test_config_errors_at_build_time():
    with pytest.raises(ConfigError, match="budget is required"):
        build("dapq")
    with pytest.raises(ConfigError, match="invalid budget"):
        build("dapq", budget=0)
    with pytest.raises(UnknownNameError, match="valid methods are"):
        build("no-such-method", budget=8)
    with pytest.raises(ConfigError, match="valid overrides are"):
        build("dapq", budget=8, pooling="avg")
    with pytest.raises(ConfigError, match="valid options"):
        build("dapq", budget=8, scorer={"kernal": 3})


def test_a_budget_for_a_method_that_keeps_everything():
    with pytest.raises(ConfigError, match="do not pass a budget"):
        build("full", budget=8)


# ----------------------------------------------------------------------------------------------
# Pipeline.generate options (tiny offline tokenizer)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"temperature": 0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0}, "top_p"),
        ({"do_smaple": True}, "do_smaple"),
        ({"num_beams": 4}, "num_beams"),
    ],
)
def test_bad_generation_options(word_tokenizer, options, field):
    pipeline = build("dapq", budget=8)
    with pytest.raises(ConfigError) as info:
        pipeline.generate(tiny_model("llama"), word_tokenizer, CONTEXT, "where is the needle ?", max_new_tokens=3,
                          **options)
    message = str(info.value)
    assert message.startswith("invalid generation options")
    assert field in message
    assert "valid options: do_sample, temperature, top_k, top_p, seed, stop_at_eos" in message


def test_generate_runs_with_the_tiny_tokenizer(word_tokenizer):
    """The success path next to the error paths: the same call without bad options answers."""
    model = tiny_model("llama")
    pipeline = build("dapq", budget=8)
    answer = pipeline.generate(model, word_tokenizer, CONTEXT, "where is the needle ?", max_new_tokens=4)
    assert isinstance(answer, str) and answer
    assert pipeline.last_report.budget == 8
    sampled = pipeline.generate(model, word_tokenizer, CONTEXT, "where is the needle ?", max_new_tokens=4,
                                do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=3)
    again = pipeline.generate(model, word_tokenizer, CONTEXT, "where is the needle ?", max_new_tokens=4,
                              do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=3)
    assert sampled == again  # the seed makes sampling reproducible


def test_question_window_in_generate_needs_a_question(word_tokenizer):
    pipeline = build("dapq", budget=8, window="question")
    with pytest.raises(UnsupportedInputError, match="question_span"):
        pipeline.generate(tiny_model("llama"), word_tokenizer, CONTEXT, question=None, max_new_tokens=2)
    answer = pipeline.generate(tiny_model("llama"), word_tokenizer, CONTEXT, "where is the needle ?", max_new_tokens=2)
    assert isinstance(answer, str)


# ----------------------------------------------------------------------------------------------
# caches whose layers / heads hold different numbers of rows (per-layer and per-head budgets)
# ----------------------------------------------------------------------------------------------


def test_a_compressed_cache_read_by_an_ordinary_attention_is_refused():
    model = tiny_model("llama")
    result = build("pyramidkv", budget=48).prefill(model, random_ids(120))
    restore_attention(model)
    with pytest.raises(UnsupportedModelError, match="use_compressed_attention"):
        model(input_ids=random_ids(3, seed=1), cache=result.cache)


def test_sliding_layers_without_past_recording_are_refused_with_the_fix():
    """transformers releases before 5.24 cannot keep a sliding layer's rows past its window for one forward."""
    from kvpress_like.compat import record_sliding_past

    with pytest.raises(UnsupportedModelError, match="upgrade transformers"):
        record_sliding_past(object())
