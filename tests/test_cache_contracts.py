"""transformers' cache contract on every cache kvpress_like builds: dense with uniform budgets, per-layer (pyramid)
budgets, head-adaptive (ragged), a padded batch (ragged per sequence) and a progressive prefill.

* beam search, ``model.generate(num_beams=2)`` after ``cache.batch_repeat_interleave(2)``, gives what a naive beam
  search gives that never reorders a cache (each beam continues a shallow copy of its parent's cache); with a
  budget that keeps every token it gives what beam search on the uncompressed cache gives;
* offloading every layer (``Cache.offload``) and bringing it back (``prefetch``) mid-decoding changes nothing;
* ``reset`` leaves a cache that continues like a fresh one; ``crop`` of a ragged layer is refused by name;
* the compressed attention calls the implementation the public mapping (``ALL_ATTENTION_FUNCTIONS``) holds.

Decode-time compression refuses beam search (``tests/test_decode_compression.py``).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import random_ids, tiny_model
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvpress_like import build
from kvpress_like.compat import cache_kwarg
from kvpress_like.errors import UnsupportedInputError
from kvpress_like.pipeline import left_padded
from kvpress_like.prefill import feed, shallow_copy
from kvpress_like.ragged import RaggedLayer

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

BEAMS, STEPS, BUDGET = 2, 4, 40
CONTEXT, QUESTION = random_ids(120, seed=1), random_ids(5, seed=2)
PADDED_CONTEXTS = [random_ids(n, seed=n)[0] for n in (70, 90)]
PADDED_QUESTIONS = random_ids(5, batch=2, seed=3)

# case -> (method, prefill options, padded batch?, a layer type the cache must hold)
CASES = {
    "dense uniform": ("snapkv", {}, False, "DynamicLayer"),
    "per-layer budgets": ("pyramidkv", {}, False, "DynamicLayer"),
    "head-adaptive": ("ada_snapkv", {}, False, "RaggedLayer"),
    "progressive head-adaptive": ("ada_snapkv", {"prompt_chunk": 32}, False, "RaggedLayer"),
    "padded batch": ("snapkv", {}, True, "RaggedLayer"),
}


@functools.cache
def _model():
    """A private float64 copy (beam search compares sums of log-probabilities: no float32 near-ties), 4 layers."""
    return copy.deepcopy(tiny_model("llama", num_hidden_layers=4, initializer_range=0.1)).double()


def _prefill(case: str, budget=BUDGET):
    """``(cache, context ids, 2-D mask or None)`` of one case, the layer type checked."""
    method, options, padded, layer_type = CASES[case]
    if padded:
        ids, mask = left_padded(PADDED_CONTEXTS)
        cache = build(method, budget=budget).prefill(_model(), ids, mask).cache
    else:
        ids, mask = CONTEXT, None
        cache = build(method, budget=budget).prefill(_model(), ids, **options).cache
    assert layer_type in {type(layer).__name__ for layer in cache.layers}
    return cache, ids, mask


def _generate_beams(cache, context, mask, questions) -> list[list[int]]:
    """``model.generate`` with beams on a prefilled cache: the new tokens of each sequence."""
    model = _model()
    cache.batch_repeat_interleave(BEAMS)  # generate expands the inputs, not a cache it is given
    ids = torch.cat([context, questions], 1)
    options = {} if mask is None else {"attention_mask": torch.cat([mask, torch.ones_like(questions)], 1)}
    out = model.generate(ids, num_beams=BEAMS, max_new_tokens=STEPS, do_sample=False, **options,
                         **{cache_kwarg(model): cache})
    return out[:, ids.shape[1] :].tolist()


def naive_beam_search(cache, question: torch.Tensor) -> list[int]:
    """Beam search without reordering: keep the ``BEAMS`` best sums of log-probabilities (float32, as
    transformers adds them); each chosen continuation feeds its token into a shallow copy of its parent's cache."""
    model = _model()
    beams = [(torch.tensor(0.0), [], cache, feed(model, cache, question))]
    for step in range(STEPS):
        candidates = []
        for score, tokens, parent, logits in beams:
            logprobs = logits[0].float().log_softmax(-1) + score
            values, indices = logprobs.topk(BEAMS)
            candidates += [(value, [*tokens, int(token)], parent) for value, token in zip(values, indices, strict=True)]
        candidates.sort(key=lambda candidate: -float(candidate[0]))
        beams = []
        for score, tokens, parent in candidates[:BEAMS]:
            child = shallow_copy(parent)
            last = step == STEPS - 1
            beams.append((score, tokens, child, None if last else feed(model, child, torch.tensor([tokens[-1:]]))))
    return max(beams, key=lambda beam: float(beam[0]))[1]


@pytest.mark.parametrize("case", [c for c in CASES if not CASES[c][2]])
def test_beam_search_on_a_compressed_cache_equals_a_naive_beam_search(case):
    cache, context, _ = _prefill(case)
    expected = naive_beam_search(shallow_copy(cache), QUESTION)
    assert _generate_beams(cache, context, None, QUESTION) == [expected]


def test_beam_search_on_a_padded_batch_gives_each_sequence_its_beams_alone():
    cache, ids, mask = _prefill("padded batch")
    got = _generate_beams(cache, ids, mask, PADDED_QUESTIONS)
    for row, context in enumerate(PADDED_CONTEXTS):
        alone = build("snapkv", budget=BUDGET).prefill(_model(), context[None]).cache
        assert got[row] == naive_beam_search(alone, PADDED_QUESTIONS[row : row + 1]), f"sequence {row}"


@pytest.mark.parametrize("case", [c for c in CASES if not CASES[c][2] and CASES[c][0] != "pyramidkv"])
def test_beam_search_with_a_budget_that_keeps_everything_equals_the_uncompressed_cache(case):
    method, options, _, _ = CASES[case]
    model = _model()
    cache = build(method, budget=CONTEXT.shape[1]).prefill(model, CONTEXT, **options).cache
    uncompressed = DynamicCache(config=model.config)
    model(input_ids=CONTEXT, **{cache_kwarg(model): uncompressed})
    assert _generate_beams(cache, CONTEXT, None, QUESTION) == _generate_beams(uncompressed, CONTEXT, None, QUESTION)


def _greedy_logits(cache, logits: torch.Tensor, steps: int) -> torch.Tensor:
    out = []
    for _ in range(steps):
        logits = feed(_model(), cache, logits.argmax(-1, keepdim=True))
        out.append(logits)
    return torch.stack(out)


@pytest.mark.parametrize("case", list(CASES))
def test_offloading_every_layer_mid_decoding_changes_nothing(case):
    cache, _, _ = _prefill(case)
    questions = PADDED_QUESTIONS if CASES[case][2] else QUESTION
    logits = feed(_model(), cache, questions)  # ragged layers now hold their rows in the decode buffer
    expected = _greedy_logits(shallow_copy(cache), logits, 3)
    for layer_idx in range(len(cache.layers)):
        cache.offload(layer_idx, only_non_sliding=False)
    assert all(t.device.type == "cpu" for layer in cache.layers for t in _tensors(layer))
    for layer in cache.layers:
        layer.prefetch()
    torch.testing.assert_close(_greedy_logits(cache, logits, 3), expected, rtol=0, atol=0)


def _tensors(layer) -> list[torch.Tensor]:
    if isinstance(layer, RaggedLayer):
        return [part for parts in (layer.key_parts, layer.value_parts) for row in parts for part in row]
    return [layer.keys, layer.values]


@pytest.mark.parametrize("case", list(CASES))
def test_a_reset_cache_continues_like_a_fresh_one(case):
    cache, _, _ = _prefill(case)
    cache.reset()
    batch = 2 if CASES[case][2] else 1
    ids = random_ids(6, batch=batch, seed=4)
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    fresh = DynamicCache(config=_model().config)
    expected = _model()(input_ids=ids, **{cache_kwarg(_model()): fresh}).logits[:, -1]
    torch.testing.assert_close(feed(_model(), cache, ids), expected, atol=1e-10, rtol=1e-10)


def test_cropping_a_ragged_cache_is_refused_by_name():
    cache, _, _ = _prefill("head-adaptive")
    cache.crop(0)  # what generate's stop check may call: nothing removed
    with pytest.raises(UnsupportedInputError, match="crop"):
        cache.crop(-1)


def test_the_compressed_attention_calls_what_the_public_mapping_holds():
    """A local override in ``ALL_ATTENTION_FUNCTIONS`` (transformers' public mapping) is what each layer runs;
    the private class-wide mapping would not see it."""
    cache, _, _ = _prefill("head-adaptive")
    original, calls = ALL_ATTENTION_FUNCTIONS["sdpa"], []

    def spy(*args, **kwargs):
        calls.append(args[0].layer_idx)
        return original(*args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = spy
    try:
        feed(_model(), cache, QUESTION[:, :1])
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert calls == list(range(_model().config.num_hidden_layers))
