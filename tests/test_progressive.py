"""Progressive (compress-as-you-go) prefill: the prompt in chunks, every layer compressed after each chunk.

* one chunk holding the whole prompt is the one-pass prefill: same kept tokens, same logits;
* a budget that holds the whole prompt keeps everything: the logits of an uncompressed prefill;
* whatever the chunks, every layer keeps its budget of distinct prompt positions, the method's protected
  tokens (sinks, the last tokens) among them, and the cache never holds more than the budget + one chunk
  + the window's appended rows per layer;
* the compressed cache continues like any other (our loop = ``model.generate``);
* parts that cannot stream and padded batches are refused with what to do instead (a model-wide allocation
  too: tests/test_kvzip.py).
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
from kvpress_like.parts import Scorer, WindowBuilder, WindowPlan
from kvpress_like.prefill import forward

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

STREAMING = any_model_methods()
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def _model(arch: str):
    """A private float64 copy with 4 layers (pyramid budgets differ per layer)."""
    model = tiny_model(arch, num_hidden_layers=4, initializer_range=0.1)
    return copy.deepcopy(model).double()


def _pipeline(method: str, budget):
    return build(method) if method == "full" else build(method, budget=budget)


def _kept(layer_report) -> list[torch.Tensor]:
    kept = layer_report.kept_indices
    return list(kept[0]) if isinstance(kept, torch.Tensor) else kept[0]


@SETTINGS
@given(method=st.sampled_from(STREAMING), arch=st.sampled_from(["llama", "qwen3"]), length=st.integers(110, 200),
       budget=st.sampled_from(["30%", 60]))
def test_one_chunk_holding_the_prompt_is_the_one_pass_prefill(method, arch, length, budget):
    model, ids = _model(arch), random_ids(length, seed=length)
    try:
        one_pass = _pipeline(method, budget).prefill(model, ids)
    except ConfigError:  # protected tokens that the budget cannot hold: the progressive prefill refuses too
        with pytest.raises(ConfigError):
            _pipeline(method, budget).prefill(model, ids, prompt_chunk=length + 7)
        return
    progressive = _pipeline(method, budget).prefill(model, ids, prompt_chunk=length + 7)
    for layer, report in one_pass.report.layers.items():
        for got, want in zip(_kept(progressive.report.layers[layer]), _kept(report), strict=True):
            assert torch.equal(got, want)
    torch.testing.assert_close(progressive.next_token_logits, one_pass.next_token_logits)
    assert progressive.report.cache_bytes_after == one_pass.report.cache_bytes_after
    assert progressive.report.cache_bytes_before == one_pass.report.cache_bytes_before


@SETTINGS
@given(arch=st.sampled_from(["llama", "qwen3"]), length=st.integers(60, 200), chunk=st.integers(16, 64))
def test_a_budget_that_holds_the_prompt_gives_the_uncompressed_logits(arch, length, chunk):
    model, ids = _model(arch), random_ids(length, seed=length)
    result = build("snapkv", budget=length).prefill(model, ids, prompt_chunk=chunk)
    plain = forward(model, None, ids, torch.arange(length))
    torch.testing.assert_close(result.next_token_logits, plain)
    assert all(torch.equal(index, torch.arange(length)) for r in result.report.layers.values() for index in _kept(r))


@SETTINGS
@given(method=st.sampled_from(STREAMING), length=st.integers(160, 260), chunk=st.integers(40, 90),
       budget=st.sampled_from(["25%", 70]))
def test_every_chunking_keeps_the_budget_the_protected_tokens_and_bounds_the_cache(method, length, chunk, budget):
    model, ids = _model("llama"), random_ids(length, seed=length + chunk)
    pipeline = _pipeline(method, budget)
    result = pipeline.prefill(model, ids, prompt_chunk=chunk)
    report, cache = result.report, result.cache
    ends = sorted({length - k * chunk for k in range(-(-length // chunk))})
    appended = max(pipeline.window.plan_round(ids[:, :end], start).n_appended  # the largest round's window
                   for start, end in zip([0, *ends[:-1]], ends, strict=True))
    protected = None
    if report.budget < length:
        protected = pipeline.selector.checked_protected_mask(length, report.budget, "cpu")
    bound = 0
    for layer, layer_report in report.layers.items():
        kept = _kept(layer_report)
        counts = [index.numel() for index in kept]
        assert sum(counts) == min(layer_report.budget, length) * len(kept)  # head-adaptive: the same total
        for index in kept:
            assert torch.equal(index, torch.unique(index)) and int(index.min()) >= 0 and int(index.max()) < length
            if protected is not None and index.numel() == layer_report.budget:
                assert bool(torch.isin(protected.nonzero().flatten(), index).all())
        bound += (max(counts) + chunk + appended) * cache.token_nbytes(layer)
    assert report.peak_cache_bytes <= bound
    assert report.prompt_chunk == chunk
    assert cache.get_seq_length() == length


def test_a_progressive_cache_continues_like_any_other():
    model, ids = _model("llama"), random_ids(180, seed=3)
    question = random_ids(5, seed=4)
    ours = build("pyramidkv", budget="30%").prefill(model, ids, prompt_chunk=50)
    theirs = build("pyramidkv", budget="30%").prefill(model, ids, prompt_chunk=50)
    from kvpress_like.prefill import feed

    logits = feed(model, ours.cache, question)
    (answer,) = decode_batch(model, ours.cache, logits, 6, GenerationOptions(), set())
    out = model.generate(torch.cat([ids, question], dim=1), max_new_tokens=6, do_sample=False,
                         **{cache_kwarg(model): theirs.cache})
    assert out[0, ids.shape[1] + question.shape[1]:].tolist() == answer


class WholePromptScorer(Scorer):
    """Reads hidden states without summing them over rounds: a progressive prefill must refuse it."""

    name = "whole_prompt"
    reads_hidden_states = True

    def score(self, ctx):
        return ctx.hidden_states.norm(dim=-1)[:, None].expand(-1, ctx.keys.shape[1], -1)


class GrowingWindow(WindowBuilder):
    """A window whose rounds would grow with the prompt."""

    name = "growing"
    streams = False

    def plan(self, input_ids, question_span=None):
        return WindowPlan(input_ids.shape[1], torch.arange(input_ids.shape[1]))


@pytest.mark.parametrize(("part", "message"), [
    ("scorer", "reads the whole prompt's hidden states"),
    ("window", "rounds append rows that grow with the prompt"),
])
def test_parts_that_cannot_stream_are_refused(part, message):
    pipeline = build("snapkv", budget="30%")
    setattr(pipeline, part, WholePromptScorer() if part == "scorer" else GrowingWindow())
    with pytest.raises(UnsupportedInputError, match=message):
        pipeline.prefill(_model("llama"), random_ids(120), prompt_chunk=40)


def test_a_padded_batch_is_refused_with_the_alternative():
    ids, mask = random_ids(60, batch=2), torch.ones(2, 60, dtype=torch.long)
    mask[0, :10] = 0
    with pytest.raises(UnsupportedInputError, match="without prompt_chunk"):
        build("snapkv", budget=20).prefill(_model("llama"), ids, mask, prompt_chunk=30)


@SETTINGS
@given(method=st.sampled_from(["snapkv", "dapq", "dapq_plus", "pyramidkv", "ada_dapq", "tova"]),
       length=st.integers(160, 260), chunk=st.integers(40, 90))
def test_an_interim_budget_that_holds_the_prompt_makes_the_last_round_the_one_pass_selection(method, length, chunk):
    """Keeping every row between chunks leaves the last round the whole prompt and the method's real window (inside
    the last chunk or appended): the one-pass prefill's tokens, whatever the chunks."""
    model, ids = _model("llama"), random_ids(length, seed=length + chunk)
    one_pass = _pipeline(method, "25%").prefill(model, ids)
    progressive = _pipeline(method, "25%").prefill(model, ids, prompt_chunk=chunk, interim_factor=length)
    for layer, report in one_pass.report.layers.items():
        for got, want in zip(_kept(progressive.report.layers[layer]), _kept(report), strict=True):
            assert torch.equal(got, want)
    assert progressive.report.cache_bytes_after == one_pass.report.cache_bytes_after


def test_a_larger_interim_budget_holds_more_between_chunks_and_is_checked():
    model, ids = _model("llama"), random_ids(240, seed=9)
    tight = build("snapkv", budget=40).prefill(model, ids, prompt_chunk=60)
    loose = build("snapkv", budget=40).prefill(model, ids, prompt_chunk=60, interim_factor=2)
    assert loose.report.peak_cache_bytes > tight.report.peak_cache_bytes
    assert loose.report.cache_bytes_after == tight.report.cache_bytes_after
    for bad in (0.5, True, "2"):
        with pytest.raises(ConfigError, match="interim_factor must be a number"):
            build("snapkv", budget=40).prefill(model, ids, prompt_chunk=60, interim_factor=bad)
    with pytest.raises(ConfigError, match="give prompt_chunk too"):
        build("snapkv", budget=40).prefill(model, ids, interim_factor=2)


def test_a_window_that_cannot_be_planned_on_a_prefix_is_refused_with_the_alternative():
    """The question window needs the question, which an early chunk's prefix does not hold yet."""
    ids = random_ids(120, seed=2)
    pipeline = build("dapq", budget=40, window="question")
    with pytest.raises(UnsupportedInputError, match=r"cannot plan one of 40 tokens.*without prompt_chunk"):
        pipeline.prefill(_model("llama"), ids, question_span=(100, 110), prompt_chunk=40)
