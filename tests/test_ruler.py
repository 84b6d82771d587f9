"""RULER's offline tasks: each sample has its template's structure, fits its length, is reproducible, and RULER's
string-match metrics score the reference 1, a wrong answer 0 and a partial one in between."""

from __future__ import annotations

import collections
import itertools
import math
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_like.errors import ConfigError
from kvpress_like.eval.metrics import wilson_interval
from kvpress_like.eval.ruler import NIAH, NOISE, string_match_all, string_match_part, zeta, zipf_counts
from kvpress_like.eval.ruler_calibration import DOCUMENT, calibration, render
from kvpress_like.eval.tasks import TASKS, make_samples
from kvpress_like.eval.toy import byte_tokenizer

RULER = sorted(name for name in TASKS if name.startswith("ruler_"))
TARGET = 3000  # bytes of the toy tokenizer: one token each
OPTIONS = {"ruler_vt": {"example_tokens": 1200}}  # RULER's 500-token example does not fit in 500 bytes
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def generate(tokenizer, task, seed=3, target=TARGET, depth=0.5):
    return TASKS[task].generate(tokenizer, target, depth, seed, **OPTIONS.get(task, {}))


def count(tokenizer, text):
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_eleven_ruler_tasks_are_registered_and_ignore_the_depth(tokenizer):
    assert len(RULER) == 11
    assert {f"ruler_{name}" for name in NIAH} | {"ruler_vt", "ruler_cwe", "ruler_fwe"} == set(RULER)
    for task in RULER:
        assert not TASKS[task].uses_depth
        assert generate(tokenizer, task, depth=0.1) == generate(tokenizer, task, depth=0.9)


@pytest.mark.parametrize("task", RULER)
def test_a_sample_fits_its_length_and_the_metric_scores_reference_and_wrong_answers(tokenizer, task):
    sample = generate(tokenizer, task)
    prompt = [sample.context, sample.question, sample.answer_prefix.lstrip()]
    length = sum(count(tokenizer, piece) for piece in prompt) + sample.max_new_tokens
    assert sample.meta["length"] == length
    assert 0.9 * TARGET < length <= TARGET
    assert sample.task == task and sample.match == "all"
    for answer in sample.answers:
        assert answer in sample.context
    reference = ", ".join(sample.answers)
    assert sample.score(reference) == string_match_all(reference, sample.answers) == 1.0
    assert sample.score("I do not know.") == string_match_all("I do not know.", sample.answers) == 0.0
    if len(sample.answers) > 1:
        half = sample.answers[: len(sample.answers) // 2]
        expected = len(half) / len(sample.answers)
        assert sample.score(" ".join(half)) == string_match_all(" ".join(half), sample.answers) == expected
        assert not sample.is_correct(" ".join(half))


@pytest.mark.parametrize("task", RULER)
def test_seeds_are_reproducible_and_distinct(tokenizer, task):
    first, again, other = generate(tokenizer, task, 5), generate(tokenizer, task, 5), generate(tokenizer, task, 6)
    assert first == again and first.model_dump_json() == again.model_dump_json()
    assert first.context != other.context and first.answers != other.answers


@pytest.mark.parametrize("name", sorted(NIAH))
def test_niah_needles_keys_and_question_follow_the_configuration(tokenizer, name):
    config, sample = NIAH[name], generate(tokenizer, f"ruler_{name}")
    keys, values, asked = sample.meta["keys"], sample.meta["values"], sample.meta["asked"]
    assert len(keys) == max(config.keys, config.queries) == len(set(keys))
    assert all(len(v) == config.values for v in values) and len(asked) == config.queries
    for key, key_values in zip(keys, values, strict=True):
        for value in key_values:
            assert sample.context.count(f"One of the special magic {config.value_kind} for {key} is: {value}.") == 1
    needles = sample.context.count(f"One of the special magic {config.value_kind} for ")
    distractors = sample.meta["haystack_size"] if config.haystack == "needle" else 0
    assert needles == config.keys * config.values + distractors
    assert sample.answers == [v for key in asked for v in values[keys.index(key)]]
    for key in asked:
        assert key in sample.question and key in sample.answer_prefix
    singular = config.queries * config.values == 1
    kind = config.value_kind[:-1] if singular else config.value_kind
    opening = f"A special magic {kind} is hidden" if singular else f"Some special magic {kind} are hidden"
    assert sample.context.startswith(opening)
    assert sample.question.startswith(f"What is the special magic {kind} for" if singular
                                      else f"What are all the special magic {kind} for")
    value_form = UUID if config.value_kind == "uuids" else re.compile(r"^[1-9]\d{6}$")
    assert all(value_form.match(v) for vs in values for v in vs)
    if config.key_kind == "uuids":
        assert all(UUID.match(k) for k in keys)
    else:
        assert all(re.match(r"^[a-z]+-[a-z]+$", k) for k in keys)
    if config.haystack == "noise":
        assert sample.context.count(NOISE) == sample.meta["haystack_size"]
    unasked = [v for key, vs in zip(keys, values, strict=True) if key not in asked for v in vs]
    if unasked:  # a distractor key's value is a wrong answer
        assert sample.score(unasked[0]) == 0.0


def test_essay_needles_sit_between_sentences(tokenizer):
    sample = generate(tokenizer, "ruler_niah_multivalue")
    for value in sample.answers:
        before = sample.context.split(f"One of the special magic numbers for {sample.meta['asked'][0]} is: {value}.")[0]
        assert before.endswith((". ", "! ", "? ", ": ", "\n", ".\n")) or before.rstrip()[-1] in ".!?:"


def test_variable_tracking_chain_and_worked_example(tokenizer):
    sample = generate(tokenizer, "ruler_vt")
    names, value = sample.answers, sample.meta["value"]
    assert len(names) == 5 == len(set(names)) and all(re.match(r"^[A-Z]{5}$", n) for n in names)
    example, task_text = sample.context.rsplit("Memorize and track", 1)
    lines = task_text.splitlines()
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in itertools.pairwise(names)]
    assert [line for line in lines if line.startswith("VAR")] == chain
    assert sum(line == NOISE for line in lines) == sample.meta["haystack_size"]
    assert f"value {value} " in sample.question and "5 variables are assigned the value" in sample.answer_prefix
    shown = example.strip().splitlines()[-1].split("they are: ")[1].split()
    assert len(shown) == 5 and all(re.match(r"^[A-Z]{3}$", n) for n in shown)
    assert sample.score(" ".join(names[:2])) == pytest.approx(0.4)


@pytest.mark.parametrize(("target", "repeats", "rare"), [(TARGET, 6, 1), (8192, 30, 3)])
def test_common_words_counts_follow_rulers_two_settings(tokenizer, target, repeats, rare):
    sample = generate(tokenizer, "ruler_cwe", target=target)
    listed = sample.context.rsplit("\n", 1)[1]
    entries = re.findall(r"(\d+)\. ([a-z]+)", listed)
    assert [int(n) for n, _ in entries] == list(range(1, len(entries) + 1))
    frequency = collections.Counter(word for _, word in entries)
    assert len(sample.answers) == 10 and {frequency[w] for w in sample.answers} == {repeats}
    assert {c for w, c in frequency.items() if w not in sample.answers} == {rare}
    assert "10 most common words" in sample.question
    assert sample.score(" ".join(sample.answers[:5])) == 0.5


def test_frequent_words_follow_zipf_and_the_answer_is_the_top_three(tokenizer):
    sample = generate(tokenizer, "ruler_fwe")
    words = sample.context.split("coded words. ", 1)[1].split()
    frequency = collections.Counter(words)
    ranked = [w for w, _ in frequency.most_common()]
    assert ranked[0] == "..." and ranked[1:4] == sample.answers
    assert sorted(frequency.values(), reverse=True)[:5] == sample.meta["counts"]
    assert all(re.match(r"^[a-z]{6}$", w) for w in sample.answers)


def test_zipf_counts_and_zeta():
    assert zeta(2.0) == pytest.approx(math.pi**2 / 6, rel=1e-9)
    assert zeta(4.0) == pytest.approx(math.pi**4 / 90, rel=1e-9)
    assert zipf_counts(1000, 4, 2.0) == [int(1000 * k**-2 / (math.pi**2 / 6)) for k in range(1, 5)]
    with pytest.raises(ConfigError, match="alpha > 1"):
        zeta(1.0)


def test_a_too_short_target_names_the_task(tokenizer):
    with pytest.raises(ConfigError, match=r"'cwe' needs more than 500 tokens.*longer context"):
        TASKS["ruler_cwe"].generate(tokenizer, 500, 0.5, 0)
    with pytest.raises(ConfigError, match="vt's example"):
        TASKS["ruler_vt"].generate(tokenizer, 3000, 0.5, 0)  # the default 500-token example, in bytes


def test_make_samples_gives_distinct_seeded_samples(tokenizer):
    samples = make_samples(tokenizer, "ruler_niah_single_2", 1500, 4, seed=20)
    assert [s.meta["seed"] for s in samples] == [20, 21, 22, 23]
    assert len({s.answers[0] for s in samples}) == 4


def naive_match_all(prediction, references):
    found = 0
    for reference in references:
        found += 1 if reference.lower() in prediction.lower() else 0
    return found / len(references)


TEXT = st.text(alphabet="abcXYZ 0123", max_size=12)


@given(TEXT, st.lists(TEXT.filter(bool), min_size=1, max_size=4))
def test_string_match_metrics_equal_the_naive_definitions(prediction, references):
    assert string_match_all(prediction, references) == naive_match_all(prediction, references)
    assert string_match_part(prediction, references) == float(any(r.lower() in prediction.lower() for r in references))
    assert string_match_part(prediction, references) >= string_match_all(prediction, references)


@given(st.text(alphabet="abc 012", max_size=12),
       st.lists(st.text(alphabet="abc012", min_size=1), min_size=1, max_size=4))
def test_the_harness_score_is_string_match_all_when_case_does_not_matter(prediction, references):
    from kvpress_like.eval.tasks import Sample

    sample = Sample(task="t", context="c", question="q", answers=references, meta={"match": "all"})
    assert sample.score(prediction) == string_match_all(prediction, references)


def test_rulers_metric_ignores_case_where_the_harness_score_does_not():
    from kvpress_like.eval.tasks import Sample

    sample = Sample(task="t", context="c", question="q", answers=["ABCDE"], meta={"match": "all"})
    assert string_match_all("abcde", ["ABCDE"]) == 1.0 and sample.score("abcde") == 0.0


@settings(max_examples=12, deadline=None)
@given(task=st.sampled_from([f"ruler_{name}" for name in NIAH]), seed=st.integers(0, 10**6),
       target=st.integers(1200, 4000))
def test_any_niah_sample_fits_and_holds_each_needle_once(task, seed, target):
    tokenizer = byte_tokenizer()
    sample = TASKS[task].generate(tokenizer, target, 0.5, seed)
    assert sample.meta["length"] <= target
    for value in sample.answers:
        assert sample.context.count(f" is: {value}.") == 1


CALIBRATION = Path(__file__).resolve().parent.parent / "docs" / "results" / "ruler-calibration"


def _record(task, score, correct, seconds=2.0):
    return {"task": task, "length": 1024, "seconds": seconds,
            "reference": {"score": score, "correct": correct, "answer_tokens": 4}}


def test_calibration_keeps_a_task_from_a_half_score_on():
    records = [_record("a", 1.0, True), _record("a", 0.0, False), _record("b", 0.5, False), _record("b", 0.25, False)]
    rows = {row["task"]: row for row in calibration(records)}
    assert rows["a"]["score"] == 0.5 and rows["a"]["keep"] and rows["a"]["right"] == 1
    assert rows["b"]["score"] == 0.375 and not rows["b"]["keep"] and rows["b"]["right"] == 0
    assert rows["a"]["interval"] == wilson_interval(1, 2)


def test_the_published_calibration_is_rendered_from_its_records():
    assert (CALIBRATION / DOCUMENT).read_text() == render(CALIBRATION)
