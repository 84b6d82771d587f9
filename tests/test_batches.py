"""Padded batches and continuations: every compressed cache behaves like a transformers cache.

* a left-padded batch keeps, per sequence, exactly what that sequence keeps alone, gives the same
  next-token logits and the same greedy continuation (our loop and ``model.generate``);
* a padded multi-token continuation (questions of different lengths) gives each sequence the logits
  it gets alone;
* ``model.generate`` continues any method's compressed cache with a multi-token question, as our own
  decode loop does (the kvpress protocol: compress the context, then ask);
* ``Pipeline.generate`` answers a list of contexts as it answers each one;
* ``prefill_many`` of a padded batch (several pipelines, one prompt forward) splits into what each
  sequence gives alone.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import any_model_methods, random_ids, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpress_like import build
from kvpress_like.compat import cache_kwarg
from kvpress_like.decoding import GenerationOptions, decode_batch
from kvpress_like.errors import ConfigError, UnsupportedInputError
from kvpress_like.pipeline import left_padded
from kvpress_like.prefill import feed, prefill_many
from kvpress_like.unbatch import split_batch

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

METHODS = any_model_methods()
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GREEDY = GenerationOptions()


@functools.cache
def _model(arch: str, backend: str):
    """A private copy (a compressed prefill switches its model's attention), 4 layers for pyramid budgets.

    A batch computes in another order than one sequence alone, which float32 near-ties (key norms,
    scores) would expose, so sdpa runs in float64. Eager stays in float32: transformers' eager attention
    takes its softmax in float32, where float64's mask value becomes -inf and a left-padding row that
    sees no key turns into NaN.
    """
    overrides = {"num_hidden_layers": 4, "initializer_range": 0.1}
    model = copy.deepcopy(tiny_model(arch, attn_implementation=backend, **overrides))
    return model.double() if backend == "sdpa" else model


def _pipeline(method: str, budget):
    return build(method) if method == "full" else build(method, budget=budget)


def _same_kept(batch_layer, alone_layer, row: int) -> None:
    alone = alone_layer.kept_indices
    alone_rows = list(alone[0]) if isinstance(alone, torch.Tensor) else alone[0]
    for got, want in zip(batch_layer.kept_indices[row], alone_rows, strict=True):
        assert torch.equal(got, want)


@SETTINGS
@given(
    method=st.sampled_from(METHODS),
    arch=st.sampled_from(["llama", "qwen3"]),
    backend=st.sampled_from(["sdpa", "eager"]),
    lengths=st.lists(st.integers(70, 130), min_size=1, max_size=4),
    budget=st.sampled_from(["40%", 50]),
    new_tokens=st.integers(1, 4),
)
def test_a_padded_batch_keeps_and_continues_each_sequence_as_alone(method, arch, backend, lengths, budget, new_tokens):
    model = _model(arch, backend)
    prompts = [random_ids(n, seed=n)[0] for n in lengths]
    ids, mask = left_padded(prompts)
    try:
        batch = _pipeline(method, budget).prefill(model, ids, mask)
    except ConfigError:  # protected tokens that a short sequence's budget cannot hold: alone it fails too
        with pytest.raises(ConfigError):
            for prompt in prompts:
                _pipeline(method, budget).prefill(model, prompt[None])
        return
    answers = decode_batch(model, batch.cache, batch.next_token_logits, new_tokens, GREEDY, set())
    for row, prompt in enumerate(prompts):
        alone = _pipeline(method, budget).prefill(model, prompt[None])
        for layer, report in alone.report.layers.items():
            _same_kept(batch.report.layers[layer], report, row)
        torch.testing.assert_close(batch.next_token_logits[row], alone.next_token_logits[0], atol=1e-4, rtol=1e-4)
        (expected,) = decode_batch(model, alone.cache, alone.next_token_logits, new_tokens, GREEDY, set())
        assert answers[row] == expected


@SETTINGS
@given(
    methods=st.lists(st.sampled_from(METHODS), min_size=2, max_size=4),
    arch=st.sampled_from(["llama", "qwen3"]),
    lengths=st.lists(st.integers(70, 130), min_size=2, max_size=4),
    budget=st.sampled_from(["40%", 50]),
    new_tokens=st.integers(1, 3),
)
def test_prefill_many_of_a_padded_batch_splits_into_what_each_sequence_gives_alone(methods, arch, lengths, budget,
                                                                                   new_tokens):
    """Several pipelines share one padded prompt forward; each sequence, split off, has exactly the kept
    tokens, cache bytes, logits and greedy continuation of ``prefill_many`` on that sequence alone."""
    model = _model(arch, "sdpa")
    prompts = [random_ids(n, seed=n)[0] for n in lengths]
    ids, mask = left_padded(prompts)
    pipelines = [_pipeline(method, budget) for method in methods]
    try:
        batch = prefill_many(model, ids, pipelines, attention_mask=mask)
    except ConfigError:  # protected tokens that a short sequence's budget cannot hold: alone it fails too
        with pytest.raises(ConfigError):
            for prompt in prompts:
                prefill_many(model, prompt[None], pipelines)
        return
    for row, prompt in enumerate(prompts):
        alone = prefill_many(model, prompt[None], pipelines)
        for together, single in zip(batch, alone, strict=True):
            part = split_batch(model, together)[row]
            for layer, report in single.report.layers.items():
                _same_kept(part.report.layers[layer], report, 0)
            assert part.report.budget == single.report.budget
            assert (part.report.cache_bytes_before, part.report.cache_bytes_after) == (
                single.report.cache_bytes_before, single.report.cache_bytes_after)
            assert part.cache.nbytes() == single.cache.nbytes()
            torch.testing.assert_close(part.next_token_logits, single.next_token_logits, atol=1e-6, rtol=1e-6)
            assert decode_batch(model, part.cache, part.next_token_logits, new_tokens, GREEDY, set()) == (
                decode_batch(model, single.cache, single.next_token_logits, new_tokens, GREEDY, set()))


def test_only_a_cache_straight_from_its_prefill_splits():
    model = _model("llama", "sdpa")
    ids, mask = left_padded([random_ids(n, seed=n)[0] for n in (80, 100)])
    result = build("snapkv", budget=40).prefill(model, ids, mask)
    feed(model, result.cache, random_ids(2, batch=2, seed=5))
    with pytest.raises(UnsupportedInputError, match="split before feeding it"):
        split_batch(model, result)


@SETTINGS
@given(
    method=st.sampled_from(["snapkv", "dapq", "pyramidkv", "ada_dapq", "full", "streaming_llm"]),
    backend=st.sampled_from(["sdpa", "eager"]),
    lengths=st.lists(st.integers(90, 130), min_size=2, max_size=3),
    question_lengths=st.lists(st.integers(1, 6), min_size=3, max_size=3),
)
def test_a_padded_continuation_gives_each_sequence_its_own_logits(method, backend, lengths, question_lengths):
    model = _model("llama", backend)
    prompts = [random_ids(n, seed=n)[0] for n in lengths]
    questions = [random_ids(q, seed=100 + q)[0] for q in question_lengths[: len(prompts)]]
    ids, mask = left_padded(prompts)
    batch = _pipeline(method, "40%").prefill(model, ids, mask)
    rest, rest_mask = left_padded(questions)
    logits = feed(model, batch.cache, rest, attention_mask=rest_mask)
    follow = feed(model, batch.cache, torch.full((len(prompts), 1), 7))  # one more token: the padding stays masked
    for row, (prompt, question) in enumerate(zip(prompts, questions, strict=True)):
        alone = _pipeline(method, "40%").prefill(model, prompt[None])
        torch.testing.assert_close(logits[row], feed(model, alone.cache, question[None])[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(follow[row], feed(model, alone.cache, torch.tensor([[7]]))[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_model_generate_continues_any_compressed_cache_with_a_question(method):
    """The kvpress protocol through transformers: compress the context, then ``generate`` from context + question."""
    model = _model("llama", "sdpa")
    context, question = random_ids(400, seed=1), random_ids(9, seed=2)
    result = _pipeline(method, "10%").prefill(model, context)
    cache = {cache_kwarg(model): result.cache}  # `past_key_values` before transformers 5.24
    out = model.generate(torch.cat([context, question], 1), max_new_tokens=6, do_sample=False, **cache)
    ours = _pipeline(method, "10%").prefill(model, context)
    logits = feed(model, ours.cache, question)
    (expected,) = decode_batch(model, ours.cache, logits, 6, GREEDY, set())
    assert out[0, 409:].tolist() == expected


def test_model_generate_continues_a_padded_batch_with_questions():
    model = _model("qwen3", "sdpa")
    contexts = [random_ids(n, seed=n)[0] for n in (130, 150, 141)]
    questions = random_ids(6, batch=3, seed=9)
    ids, mask = left_padded(contexts)
    result = build("pyramidkv", budget="30%").prefill(model, ids, mask)
    full_mask = torch.cat([mask, torch.ones_like(questions)], 1)
    out = model.generate(torch.cat([ids, questions], 1), attention_mask=full_mask,
                         max_new_tokens=5, do_sample=False, **{cache_kwarg(model): result.cache})
    for row, context in enumerate(contexts):
        alone = build("pyramidkv", budget="30%").prefill(model, context[None])
        logits = feed(model, alone.cache, questions[row : row + 1])
        (expected,) = decode_batch(model, alone.cache, logits, 5, GREEDY, set())
        assert out[row, ids.shape[1] + 6 :].tolist() == expected


def test_model_generate_given_only_the_prefilled_ids_is_refused_not_answered_wrongly():
    model = _model("llama", "sdpa")
    ids = random_ids(130, seed=3)
    result = build("snapkv", budget="30%").prefill(model, ids)
    with pytest.raises(UnsupportedInputError, match="already seen"):
        model.generate(ids, max_new_tokens=3, do_sample=False, **{cache_kwarg(model): result.cache})


@pytest.mark.parametrize("question_aware", [True, False])
def test_pipeline_generate_answers_a_batch_of_contexts_as_each_alone(word_tokenizer, question_aware):
    model = _model("llama", "sdpa")
    contexts = [" ".join(f"w{(i * k) % 200}" for i in range(n)) for k, n in ((3, 90), (7, 120), (11, 75))]
    questions = ["where is the needle ?", "the needle is where ?", "where ?"]
    pipeline = build("dapq", budget="30%")
    options = {"question_aware": question_aware, "max_new_tokens": 5}
    batch = pipeline.generate(model, word_tokenizer, contexts, questions, **options)
    pairs = zip(contexts, questions, strict=True)
    alone = [pipeline.generate(model, word_tokenizer, c, q, **options) for c, q in pairs]
    assert batch == alone


@pytest.mark.parametrize(
    ("contexts", "questions", "message"),
    [
        ("one context", ["q1", "q2"], "a list of questions needs a list of contexts"),
        ([], None, "the list of contexts is empty"),
        (["a", "b"], ["q1", "q2", "q3"], "2 contexts but 3 questions"),
        (["a", "b"], ["q1", None], "for every context, or for none"),
    ],
)
def test_pipeline_generate_names_what_is_wrong_with_a_batch(word_tokenizer, contexts, questions, message):
    with pytest.raises(UnsupportedInputError, match=message):
        build("dapq", budget=8).generate(_model("llama", "sdpa"), word_tokenizer, contexts, questions)


def test_a_padded_continuation_must_be_padded_on_the_left():
    model = _model("llama", "sdpa")
    cache = build("snapkv", budget=50).prefill(model, random_ids(100)).cache
    with pytest.raises(UnsupportedInputError, match="pad on the left"):
        feed(model, cache, random_ids(3), attention_mask=torch.tensor([[1, 1, 0]]))
