"""Budget: what is accepted, what is rejected (with a message naming the valid forms), and resolve()."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kvpress_like import Budget, ConfigError, build

ACCEPTED = [
    (256, {"tokens": 256}),
    (1, {"tokens": 1}),
    (0.03, {"ratio": 0.03}),
    ("3%", {"ratio": 0.03}),
    ("100%", {"ratio": 1.0}),
    (1.0, {"ratio": 1.0}),
    ("12", {"tokens": 12}),
    (" 7 % ", {"ratio": 0.07}),
    ({"tokens": 5}, {"tokens": 5}),
    ({"ratio": 0.5}, {"ratio": 0.5}),
]

REJECTED = [0, -1, 0.0, -0.5, 1.5, 2.0, "0%", "101%", "-3%", "abc", "", "%", "-3", "nan%", "inf%",
            math.nan, math.inf, -math.inf, True, False, None, [1], (1,), {"tokens": 1, "ratio": 0.5}, {}]

# What a message must mention so that the user learns what *is* valid.
VALID_HINTS = ("positive int", "(0, 1]", "(0%, 100%]")


@pytest.mark.parametrize(("value", "expected"), ACCEPTED, ids=repr)
def test_accepted_budgets(value, expected):
    budget = Budget.model_validate(value)
    assert budget.model_dump(exclude_none=True) == pytest.approx(expected)
    # the same value is accepted by build() and ends up in the pipeline's config
    assert build("dapq", budget=value).config["budget"] == pytest.approx(expected)


def test_budget_model_is_accepted_as_is_and_is_immutable():
    budget = Budget.model_validate("3%")
    assert Budget.model_validate(budget) == budget
    assert build("dapq", budget=budget).budget == budget
    with pytest.raises(ValidationError):
        budget.ratio = 0.5


@pytest.mark.parametrize("value", REJECTED, ids=repr)
def test_rejected_budgets_say_what_is_valid(value):
    with pytest.raises(ValidationError) as info:
        Budget.model_validate(value)
    message = str(info.value)
    assert any(hint in message for hint in VALID_HINTS), message
    # build() turns it into a ConfigError (a ValueError) that repeats the offending value
    with pytest.raises(ConfigError) as info:
        build("dapq", budget=value)
    if value is None:  # build(budget=None) means "no budget given"
        assert "budget is required" in str(info.value)
        return
    assert "invalid budget" in str(info.value)
    assert repr(value) in str(info.value)
    assert any(hint in str(info.value) for hint in VALID_HINTS), str(info.value)


@pytest.mark.parametrize("value", [{"tokens": True}, {"ratio": True}], ids=repr)
def test_mapping_form_rejects_booleans_like_the_scalar_form(value):
    with pytest.raises(ValidationError):
        Budget.model_validate(value)


def test_build_without_budget_is_a_config_error():
    with pytest.raises(ConfigError, match="budget is required"):
        build("dapq")


@settings(max_examples=200, deadline=None)
@given(tokens=st.integers(1, 10_000), length=st.integers(1, 10_000))
def test_resolve_tokens_is_min_of_budget_and_length(tokens, length):
    assert Budget.model_validate(tokens).resolve(length) == min(tokens, length)


@settings(max_examples=300, deadline=None)
@given(ratio=st.floats(1e-6, 1.0, exclude_min=False), length=st.integers(1, 100_000))
def test_resolve_ratio_rounds_to_nearest_and_keeps_at_least_one(ratio, length):
    resolved = Budget.model_validate(ratio).resolve(length)
    assert 1 <= resolved <= length
    exact = ratio * length
    if exact >= 1:
        assert abs(resolved - exact) <= 0.5 + 1e-9  # nearest token
    else:
        assert resolved == 1  # never below one token


@settings(max_examples=100, deadline=None)
@given(percent=st.integers(1, 100), length=st.integers(1, 5_000))
def test_percent_equals_ratio(percent, length):
    assert Budget.model_validate(f"{percent}%").resolve(length) == Budget.model_validate(percent / 100).resolve(
        length
    )


@settings(max_examples=100, deadline=None)
@given(value=st.one_of(st.integers(1, 500), st.floats(0.001, 1.0)), length=st.integers(1, 1_000))
def test_resolve_is_monotone_in_prompt_length(value, length):
    budget = Budget.model_validate(value)
    assert budget.resolve(length) <= budget.resolve(length + 1) <= budget.resolve(length) + 1


@pytest.mark.parametrize(
    ("value", "length", "expected"),
    [(256, 100, 100), (256, 1000, 256), ("100%", 37, 37), (1.0, 37, 37), ("3%", 8192, 246),
     (0.03, 100, 3), (0.001, 10, 1), ("1%", 10, 1), (0.24, 10, 2), (0.26, 10, 3)],
)
def test_resolve_examples(value, length, expected):
    assert Budget.model_validate(value).resolve(length) == expected


def test_str_is_readable():
    assert str(Budget.model_validate(256)) == "256 tokens"
    assert "0.03" in str(Budget.model_validate("3%"))
