"""Generated tasks: seeded and deterministic, answers really in the context, JSONL round trip, answer checks."""

from __future__ import annotations

import itertools

import pytest

from kvpress_like.errors import ConfigError
from kvpress_like.eval.tasks import (
    TASKS,
    Sample,
    answer_positions,
    insert_many,
    load_jsonl,
    make_samples,
    save_jsonl,
)
from kvpress_like.eval.toy import byte_tokenizer

OWN_TASKS = sorted(t for t in TASKS if not t.startswith("ruler_"))  # RULER's tasks: tests/test_ruler.py


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.mark.parametrize("task", OWN_TASKS)
def test_same_arguments_give_the_same_sample(tokenizer, task):
    first = TASKS[task].generate(tokenizer, 1500, 0.3, 7)
    again = TASKS[task].generate(tokenizer, 1500, 0.3, 7)
    other = TASKS[task].generate(tokenizer, 1500, 0.3, 8)
    assert first == again
    assert first.model_dump_json() == again.model_dump_json()
    assert first != other
    assert first.task == task


@pytest.mark.parametrize("task", OWN_TASKS)
def test_answers_are_in_the_context_and_the_sample_is_self_describing(tokenizer, task):
    sample = TASKS[task].generate(tokenizer, 1500, 0.5, 3)
    for answer in sample.answers:
        assert answer in sample.context
    assert sample.meta["max_new_tokens"] >= 1
    assert sample.answer_prefix
    assert sample.is_correct(" ".join(sample.answers))
    assert not sample.is_correct("I do not know.")
    tokens = len(tokenizer.encode(sample.context, add_special_tokens=False))
    assert 0.6 * 1500 < tokens < 1.4 * 1500


def test_needle_depth_moves_the_needle(tokenizer):
    shallow = TASKS["single_needle"].generate(tokenizer, 2000, 0.1, 1)
    deep = TASKS["single_needle"].generate(tokenizer, 2000, 0.9, 1)
    needle = f"The special magic number is {shallow.answers[0]}."
    assert shallow.answers == deep.answers  # the seed fixes the number, the depth only moves it
    assert shallow.context.index(needle) / len(shallow.context) < 0.25
    assert deep.context.index(needle) / len(deep.context) > 0.75


def test_multi_key_has_distractors_with_other_keys(tokenizer):
    sample = TASKS["multi_key"].generate(tokenizer, 1500, 0.5, 2)
    distractors = sample.meta["distractors"]
    assert len(distractors) == 3 and sample.meta["key"] not in distractors
    for key, value in distractors.items():
        assert f"for {key} is: {value}." in sample.context
    assert not sample.is_correct(next(iter(distractors.values())))


def test_multi_value_and_variable_tracking_need_every_answer(tokenizer):
    for task in ("multi_value", "variable_tracking"):
        sample = TASKS[task].generate(tokenizer, 1500, 0.2, 4)
        assert sample.match == "all" and len(sample.answers) == 4
        assert sample.score(" ".join(sample.answers[:2])) == 0.5
        assert not sample.is_correct(" ".join(sample.answers[:3]))
        assert sample.is_correct(", ".join(sample.answers))


def test_variable_tracking_chain(tokenizer):
    sample = TASKS["variable_tracking"].generate(tokenizer, 1500, 0.2, 4)
    names = sample.answers
    value = sample.question.split("value ")[1].split(" ")[0]
    assert f"VAR {names[0]} = {value}." in sample.context
    for a, b in itertools.pairwise(names):
        assert f"VAR {b} = VAR {a}." in sample.context


def test_prose_qa_quote_is_unique_and_answer_is_a_word(tokenizer):
    sample = TASKS["prose_qa"].generate(tokenizer, 1500, 0.5, 5)
    quote = sample.meta["quote"]
    assert sample.context.count(quote) == 1
    assert sample.context.split(quote, 1)[1].split()[0] == sample.answers[0]
    word = sample.answers[0]
    assert sample.is_correct(f" {word.upper()}.")  # whole word, any case
    assert not sample.is_correct(f" {word}xyz")


def test_make_samples_cycles_depths_and_seeds(tokenizer):
    samples = make_samples(tokenizer, "passkey", 600, 5, seed=10, depths=[0.0, 1.0])
    assert [s.meta["depth"] for s in samples] == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert [s.meta["seed"] for s in samples] == [10, 11, 12, 13, 14]
    assert samples == make_samples(tokenizer, "passkey", 600, 5, seed=10, depths=[0.0, 1.0])
    with pytest.raises(ConfigError, match="valid tasks are"):
        make_samples(tokenizer, "nope", 600, 1)


def test_jsonl_round_trip_and_bad_lines(tokenizer, tmp_path):
    samples = [TASKS[t].generate(tokenizer, 400, 0.5, 1) for t in OWN_TASKS]
    path = save_jsonl(samples, tmp_path / "sub" / "samples.jsonl")
    assert load_jsonl(path) == samples
    path.write_text(path.read_text() + '{"task": "x"}\n')
    with pytest.raises(ConfigError, match=r"samples.jsonl:7"):
        load_jsonl(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_user_samples_default_to_substring_match():
    sample = Sample(task="mine", context="c", question="q", answers=["42", "forty-two"])
    assert sample.is_correct("it is forty-two") and sample.max_new_tokens == 16 and sample.answer_prefix == ""


def test_insert_many_keeps_order_within_a_slot():
    text = insert_many(["a", "b"], [(0.5, "x"), (0.5, "y"), (0.0, "z")])
    assert text.split("\n\n") == ["z", "a", "x", "y", "b"]


def test_answer_positions_finds_the_last_occurrence(tokenizer):
    ids = tokenizer.encode("x 4217 y 4217 z", add_special_tokens=False)
    digits = tokenizer.encode("4217", add_special_tokens=False)
    found = answer_positions(ids, tokenizer, " 4217 ")
    assert [ids[i] for i in found] == digits
    assert found[0] > ids.index(digits[0])  # the second of the two occurrences


class _SpaceSensitiveTokenizer:
    """"7" and " 7" are different tokens, as in many BPE vocabularies."""

    def encode(self, text, add_special_tokens=False):
        return {"7": [1], " 7": [2]}[text]


def test_answer_positions_tries_the_answer_after_a_space():
    assert answer_positions([5, 2, 5], _SpaceSensitiveTokenizer(), "7") == [1]


def test_answer_positions_names_a_missing_answer(tokenizer):
    with pytest.raises(ConfigError, match="'999' does not occur in these"):
        answer_positions(tokenizer.encode("no number here", add_special_tokens=False), tokenizer, "999")
