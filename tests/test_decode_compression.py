"""Compression while generating (kvpress_like.decode_compression): the decode schedule's invariants, its
equivalence with a masked full cache, padded batches as if alone, model.generate, and its errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHITECTURES, attention_modules, full_prefill, random_ids, tiny_model
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kvpress_like import ConfigError, DecodeEvents, UnsupportedInputError, UnsupportedModelError, build
from kvpress_like.adapters import get_adapter
from kvpress_like.decode_compression import DecodeCompressor
from kvpress_like.decoding import GenerationOptions, decode_batch
from kvpress_like.prefill import feed

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

ARCHS = sorted(ARCHITECTURES)
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GREEDY = GenerationOptions(stop_at_eos=False)
DECODE_METHODS = ["snapkv", "dapq", "dapq_plus", "tova", "h2o", "streaming_llm", "knorm", "ada_snapkv", "pyramidkv"]
WINDOWS = ["recent", "reaimed", "pseudo", "none"]


def scheduled(method: str, budget, decoding: dict):
    """``build(method, budget, decoding=...)`` with the method's protected recent window shortened to 2 rows,
    so that the small targets of tiny models hold it."""
    recent = build(method, budget=budget).selector.config.recent
    return build(method, budget=budget, decoding=decoding, **({"selector": {"recent": 2}} if recent > 2 else {}))


def physical_rows_seen_by_attention(cache) -> list[tuple[int, int]]:
    """Record, for every attention call of a watched layer, (layer, rows it read): what the layer held when its
    attention ran, before any event of that step."""
    seen: list[tuple[int, int]] = []
    compressor = cache.decoding
    after_attention = compressor.after_attention

    def recording(cache, layer_idx, query, new_valid):
        seen.append((layer_idx, cache.physical_length(layer_idx)))
        after_attention(cache, layer_idx, query, new_valid)

    compressor.after_attention = recording
    return seen


@SETTINGS
@given(
    data=st.data(),
    arch=st.sampled_from(ARCHS),
    method=st.sampled_from(DECODE_METHODS),
    window=st.sampled_from(WINDOWS),
    length=st.integers(8, 48),
    new_tokens=st.integers(10, 60),
    batch=st.integers(1, 2),
)
def test_physical_cache_never_exceeds_target_plus_interval(data, arch, method, window, length, new_tokens, batch):
    """Any model, method, window and schedule: while tokens are generated one at a time, no layer's attention
    ever reads more than ``target + interval`` rows, and the logical length keeps counting every token."""
    interval = data.draw(st.integers(1, 12), label="interval")
    target = data.draw(st.integers(6, 30), label="target")
    budget = data.draw(st.integers(6, target), label="budget")
    model = tiny_model(arch)
    pipeline = scheduled(method, budget, {"interval": interval, "target": target, "window": window,
                                                      "window_size": data.draw(st.integers(5, 12), label="size")})
    result = pipeline.prefill(model, random_ids(length, batch=batch, seed=length))
    watched = list(result.cache.decoding.layers)
    initial = {i: result.cache.physical_length(i) for i in watched}
    assume(all(rows < target + interval for rows in initial.values()))
    seen = physical_rows_seen_by_attention(result.cache)
    decode_batch(model, result.cache, result.next_token_logits, new_tokens, GREEDY, set())
    assert seen and max(rows for _, rows in seen) <= target + interval
    assert result.cache.get_seq_length() == length + new_tokens - 1
    events = result.report.decoding.events
    due = {i for i, rows in initial.items() if rows + new_tokens - 1 >= target + interval}  # one row per step
    assert {event.layer_idx for event in events} == due
    assert all(event.rows_after <= target for event in events)


@SETTINGS
@given(method=st.sampled_from(DECODE_METHODS), window=st.sampled_from(WINDOWS), arch=st.sampled_from(ARCHS),
       length=st.integers(8, 40), new_tokens=st.integers(2, 30), ratio=st.booleans())
def test_target_at_least_total_length_gives_the_tokens_of_no_decode_compression(
    method, window, arch, length, new_tokens, ratio
):
    """A target (or ratio 1) that holds every token: no event, and exactly the tokens of the same method without
    a decode schedule."""
    model = tiny_model(arch)
    ids = random_ids(length, seed=7 * length)
    schedule = {"ratio": 1.0} if ratio else {"target": length + new_tokens}
    pipeline = scheduled(method, max(6, length // 2), {**schedule, "interval": 1, "window": window})
    plain = build(method, budget=max(6, length // 2), selector=pipeline.config["selector"])
    want = _greedy(model, plain, ids, new_tokens)
    result = pipeline.prefill(model, ids)
    got = decode_batch(model, result.cache, result.next_token_logits, new_tokens, GREEDY, set())
    assert got == want
    assert result.report.decoding.events == []


def _greedy(model, pipeline, ids, new_tokens, mask=None):
    result = pipeline.prefill(model, ids, mask)
    return decode_batch(model, result.cache, result.next_token_logits, new_tokens, GREEDY, set())


def _masked_reference(reference_model, held: dict[int, torch.Tensor]):
    """Pre-hooks giving each layer of an eager, uncompressed model a per-head mask that hides every logical
    position the compressed cache does not hold (``held[layer]`` ``[batch, kv_heads, total]`` bool)."""

    def pre_hook(module, args, kwargs):
        if module.layer_idx not in held:
            return None
        mask = kwargs["attention_mask"]
        keep = held[module.layer_idx]
        heads = module.config.num_attention_heads
        keep = keep.repeat_interleave(heads // keep.shape[1], dim=1)  # [B, H, total]
        q_len, kv_len = kwargs["hidden_states"].shape[1], mask.shape[-1]
        hidden = torch.zeros(keep.shape[0], heads, 1, kv_len, dtype=torch.bool)
        hidden[..., : keep.shape[-1]] = ~keep[:, :, None, :]
        new_mask = mask.expand(keep.shape[0], heads, q_len, kv_len).masked_fill(hidden, torch.finfo(mask.dtype).min)
        return args, {**kwargs, "attention_mask": new_mask}

    return [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in attention_modules(reference_model)]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(ARCHS), method=st.sampled_from(["snapkv", "dapq", "ada_snapkv", "tova", "pyramidkv"]),
       window=st.sampled_from(WINDOWS), length=st.integers(10, 40), steps=st.integers(8, 30),
       backend=st.sampled_from(["sdpa", "eager"]))
def test_decoding_from_the_compressed_cache_equals_the_full_cache_with_evicted_positions_masked(
    arch, method, window, length, steps, backend
):
    """Step by step, through decode-time events: the logits from the compressed cache equal those of an
    uncompressed eager model whose attention hides exactly the positions the compressor says it no longer
    holds, and the rows held are the full cache's keys at those positions."""
    model = tiny_model(arch, attn_implementation=backend)
    reference = copy.deepcopy(tiny_model(arch, attn_implementation="eager"))
    ids = random_ids(length, seed=length)
    tokens = random_ids(steps, seed=length + 1)
    pipeline = scheduled(method, 6, {"target": 8, "interval": 3, "window": window, "window_size": 4})
    result = pipeline.prefill(model, ids)
    cache, compressor = result.cache, result.cache.decoding
    reference_cache, _ = full_prefill(reference, ids)
    with torch.no_grad():
        for step in range(steps):
            total = length + step
            compressor.between_steps(model, cache)  # the pseudo window's events run here
            held = {}
            for i in compressor.layers:
                keep = torch.zeros(1, model.config.num_key_value_heads, total, dtype=torch.bool)
                for h, positions in enumerate(compressor.positions(cache, i)[0]):
                    keep[0, h, positions] = True
                held[i] = keep
            piece = tokens[:, step : step + 1]
            got = feed(model, cache, piece)
            handles = _masked_reference(reference, held)
            try:
                want = reference(input_ids=piece, cache=reference_cache, use_cache=True).logits[:, -1]
            finally:
                for handle in handles:
                    handle.remove()
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert result.report.decoding.events, "the schedule never compressed: the check would be vacuous"
    for i in compressor.layers:
        layer_keys = cache.layers[i].keys if hasattr(cache.layers[i], "keys") and cache.layers[i].keys is not None \
            else None
        if layer_keys is None:
            continue
        for h, positions in enumerate(compressor.positions(cache, i)[0]):
            torch.testing.assert_close(layer_keys[0, h], reference_cache.layers[i].keys[0, h, positions])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(ARCHS), method=st.sampled_from(["snapkv", "dapq", "ada_snapkv"]),
       window=st.sampled_from(["recent", "reaimed", "none"]), lengths=st.tuples(st.integers(8, 30),
                                                                                st.integers(8, 30)),
       ratio=st.booleans())
def test_a_padded_batch_decodes_each_sequence_as_if_alone(arch, method, window, lengths, ratio):
    """Left-padded sequences of different lengths, with decode-time events: each sequence's tokens are those it
    generates alone (its own targets, its own queries, its own positions)."""
    assume(lengths[0] != lengths[1])
    model = tiny_model(arch)
    rows = [random_ids(n, seed=n)[0] for n in lengths]
    schedule = {"ratio": 0.4} if ratio else {"target": 8}
    pipeline = scheduled(method, 6, {**schedule, "interval": 3, "window": window, "window_size": 4})
    alone = [_greedy(model, pipeline, row[None], 24)[0] for row in rows]
    longest = max(lengths)
    ids = torch.zeros(2, longest, dtype=torch.long)
    mask = torch.zeros(2, longest, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, longest - row.shape[0] :], mask[b, longest - row.shape[0] :] = row, 1
    batched = _greedy(model, pipeline, ids, 24, mask)
    assert batched == alone
    assert pipeline.last_report.decoding.events


@pytest.mark.parametrize("window", ["recent", "reaimed", "pseudo"])
def test_model_generate_compresses_like_the_decode_loop(window):
    """``model.generate`` on the returned cache runs the same events as our decode loop (the pseudo window
    through :class:`DecodeEvents`) and gives the same greedy tokens."""
    model = tiny_model("llama")
    ids = random_ids(30, seed=1)
    pipeline = build("dapq", budget=8, decoding={"target": 10, "interval": 4, "window": window, "window_size": 4})
    result = pipeline.prefill(model, ids)
    ours = decode_batch(model, result.cache, result.next_token_logits, 20, GREEDY, set())[0]
    loop_events = len(pipeline.last_report.decoding.events)

    result = pipeline.prefill(model, ids)
    first = result.next_token_logits.argmax(-1, keepdim=True)
    extended = torch.cat([ids, first], 1)
    processors = [DecodeEvents(model, result.cache)] if window == "pseudo" else []
    out = model.generate(extended, attention_mask=torch.ones_like(extended), cache=result.cache, max_new_tokens=19,
                         do_sample=False, logits_processor=processors)
    assert out[0, 30:].tolist() == ours
    assert len(result.report.decoding.events) == loop_events > 0


def test_a_pseudo_window_without_its_between_step_events_is_refused_not_unbounded():
    """model.generate with the faithful pseudo window but no DecodeEvents: a named error at the first missed
    event, never a cache that silently grows."""
    model = tiny_model("llama")
    ids = random_ids(20, seed=2)
    result = build("dapq", budget=6, decoding={"target": 8, "interval": 2, "window": "pseudo",
                                               "window_size": 4}).prefill(model, ids)
    extended = torch.cat([ids, result.next_token_logits.argmax(-1, keepdim=True)], 1)
    with pytest.raises(UnsupportedInputError, match="DecodeEvents"):
        model.generate(extended, attention_mask=torch.ones_like(extended), cache=result.cache, max_new_tokens=10,
                       do_sample=False)


def test_reaimed_queries_equal_queries_computed_at_the_future_positions():
    """Rotating a post-RoPE query by Δ positions gives the query the model would compute at p + Δ (RoPE is a
    rotation that composes): the re-aimed window really sits at t … t+w−1."""
    model = tiny_model("qwen3")
    adapter = get_adapter(model)
    module = adapter.attention_modules()[0]
    hidden = torch.randn(1, 5, model.config.hidden_size)
    positions = torch.tensor([3, 4, 5, 6, 7])
    queries_at = lambda p: adapter.window_queries(module, hidden, *adapter.rope_at(module, p))  # noqa: E731
    compressor = DecodeCompressor.__new__(DecodeCompressor)
    compressor.adapter = adapter
    moved = compressor._reaimed(module, queries_at(positions), positions)
    torch.testing.assert_close(moved, queries_at(positions + 5), atol=1e-5, rtol=1e-5)


def test_a_failing_event_leaves_the_layer_as_it_was():
    model = tiny_model("llama")
    pipeline = scheduled("snapkv", 6, {"target": 8, "interval": 2, "window": "recent"})
    result = pipeline.prefill(model, random_ids(20, seed=3))
    cache = result.cache
    for _ in range(3):  # grow to target + interval - 1 rows
        feed(model, cache, random_ids(1, seed=4))
    before = [(cache.layers[i].keys.clone(), list(cache.decoding.positions(cache, i)[0])) for i in range(2)]

    def broken(scores, budget):
        raise RuntimeError("selector broke")

    pipeline.selector.select = broken
    token = random_ids(1, seed=5)
    with pytest.raises(RuntimeError, match="selector broke") as raised:
        feed(model, cache, token)
    assert any("left as it was" in note for note in raised.value.__notes__)
    keys, positions = before[0]
    assert torch.equal(cache.layers[0].keys[:, :, :-1], keys)  # the rows before the step, then the new one
    assert [p.tolist() for p in cache.decoding.positions(cache, 0)[0]] == [[*p.tolist(), 20 + 3] for p in positions]


def test_the_report_records_every_event_and_the_generation_peak():
    model = tiny_model("llama")
    pipeline = scheduled("snapkv", 8, {"target": 10, "interval": 5})
    result = pipeline.prefill(model, random_ids(30, seed=6))
    decode_batch(model, result.cache, result.next_token_logits, 40, GREEDY, set())
    decoding = result.report.decoding
    layers = len(result.cache.decoding.layers)
    assert len(decoding.events) == layers * len(decoding.event_steps)
    # 8 rows after the prefill, +1 per step, cut to 10 whenever 15 are held: events at 7, 12, … rows after
    assert decoding.event_steps[:3] == [30 + 7, 30 + 12, 30 + 17]
    # the peak: the first layer at its event holds 15 rows while the later ones, not yet fed this step, hold 14
    assert decoding.peak_cache_bytes == (15 + 14 * (layers - 1)) * result.cache.token_nbytes(0)
    assert result.cache.nbytes() <= decoding.peak_cache_bytes
    assert pipeline.config["decoding"] == {"interval": 5, "target": 10, "window": "recent", "window_size": 32,
                                           "prefix": 4}


@pytest.mark.parametrize(("decoding", "message"), [
    ({"interval": 0, "target": 8}, "interval"),
    ({"target": 8, "ratio": 0.5}, "exactly one of target"),
    ({}, "exactly one of target"),
    ({"target": 8, "window": "future"}, "window"),
    ({"target": 8, "speed": 2}, "speed"),
    ({"ratio": 1.5}, "ratio"),
    ("512", "must be a dict"),
])
def test_bad_schedules_are_named(decoding, message):
    with pytest.raises(ConfigError, match=message):
        build("dapq", budget=8, decoding=decoding)


def test_a_target_below_the_protected_tokens_is_refused_at_build():
    with pytest.raises(ConfigError, match="protected tokens"):
        build("snapkv", budget=64, decoding={"target": 16, "interval": 8})  # SnapKV protects its 32 recent


def test_a_scorer_that_reads_hidden_states_is_refused_with_decoding():
    with pytest.raises(ConfigError, match="hidden states"):
        build("expected_attention", budget=8, decoding={"target": 16})


def test_beam_search_with_a_decode_schedule_is_refused():
    model = tiny_model("llama")
    ids = random_ids(20, seed=8)
    result = scheduled("snapkv", 6, {"target": 8}).prefill(model, ids)
    extended = torch.cat([ids, result.next_token_logits.argmax(-1, keepdim=True)], 1)
    with pytest.raises(UnsupportedInputError, match="decode-time compression"):
        model.generate(extended, attention_mask=torch.ones_like(extended), cache=result.cache, max_new_tokens=4,
                       num_beams=2, do_sample=False)


def test_a_model_whose_attention_cannot_be_wrapped_is_refused():
    model = copy.deepcopy(tiny_model("llama"))
    model.config._attn_implementation = "flash_attention_2"
    pipeline = scheduled("snapkv", 6, {"target": 8})
    with pytest.raises(UnsupportedModelError, match="sdpa"):
        DecodeCompressor(model, pipeline, pipeline.decoding, None, random_ids(4), padded=False)


def test_the_pseudo_window_refuses_a_padded_batch():
    model = tiny_model("llama")
    ids, mask = random_ids(12, batch=2, seed=9), torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(UnsupportedInputError, match="reaimed"):
        build("dapq", budget=6, decoding={"target": 8, "window": "pseudo"}).prefill(model, ids, mask)
