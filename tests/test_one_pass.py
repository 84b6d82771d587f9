"""The one-pass, compress-as-you-go prefill against the two-pass path, chunking, and its memory bound.

* one pass (``Pipeline.prefill``: prompt + appended window rows in one forward, each layer pruned in place)
  keeps exactly the tokens, cache rows and next-token logits of the two-pass path (``prefill_many`` with
  several pipelines: a full prompt forward, then the window's rows over a copy of the full cache);
* a chunked prefill keeps exactly what an unchunked one keeps, for every built-in method;
* the peak cache bytes (tracked by the cache) never exceed kept cache + one layer's full keys/values +
  the appended rows, and stay far below the uncompressed cache for small budgets;
* pipelines that share a window and a scorer score once in ``prefill_many`` and still keep, per budget,
  what each keeps alone.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import any_model_methods, random_ids, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpress_like import build, prefill_many
from kvpress_like.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

METHODS = any_model_methods()
ARCHS = ["llama", "qwen3", "gemma3", "phi3"]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def _model(arch: str, dtype: torch.dtype = torch.float32):
    # 4 layers (gemma3: its fixed 3) so per-layer budgets differ; peaked attention separates scores
    overrides = {} if arch == "gemma3" else {"num_hidden_layers": 4}
    return copy.deepcopy(tiny_model(arch, initializer_range=0.1, **overrides)).to(dtype)


def _pipeline(method: str, budget):
    return build(method) if method == "full" else build(method, budget=budget)


def both_or_neither(run, other):
    """Both results, or ``None`` when the first refuses the configuration and the second refuses it too
    (e.g. more protected tokens than a small budget holds)."""
    try:
        first = run()
    except ConfigError:
        with pytest.raises(ConfigError):
            other()
        return None
    return first, other()


def assert_same_compression(a, b, atol: float = 1e-5) -> None:
    """Same kept indices per layer, same cache contents, same next-token logits."""
    assert a.report.kept_indices.keys() == b.report.kept_indices.keys()
    for layer, kept in a.report.kept_indices.items():
        other = b.report.kept_indices[layer]
        if isinstance(kept, torch.Tensor):
            assert torch.equal(kept, other), f"layer {layer}"
        else:  # head-adaptive: per (sequence, head) lists
            for row, other_row in zip(kept, other, strict=True):
                for index, other_index in zip(row, other_row, strict=True):
                    assert torch.equal(index, other_index), f"layer {layer}"
    assert a.cache.get_seq_length() == b.cache.get_seq_length()
    assert a.cache.nbytes() == b.cache.nbytes()
    for i, (layer, other) in enumerate(zip(a.cache.layers, b.cache.layers, strict=True)):
        if hasattr(layer, "keys") and layer.keys is not None and hasattr(other, "keys"):
            torch.testing.assert_close(layer.keys, other.keys, atol=atol, rtol=0, msg=f"keys of layer {i}")
            torch.testing.assert_close(layer.values, other.values, atol=atol, rtol=0, msg=f"values of layer {i}")
    torch.testing.assert_close(a.next_token_logits, b.next_token_logits, atol=atol, rtol=0)


@SETTINGS
@given(
    method=st.sampled_from(METHODS),
    arch=st.sampled_from(ARCHS),
    length=st.integers(40, 120),
    budget=st.sampled_from([0.25, 0.5, 40]),
    batch=st.sampled_from([1, 2]),
)
def test_one_pass_equals_the_two_pass_path(method, arch, length, budget, batch):
    model = _model(arch)
    ids = random_ids(length, batch=batch, seed=length)
    results = both_or_neither(
        lambda: _pipeline(method, budget).prefill(model, ids),
        lambda: prefill_many(model, ids, [_pipeline(method, budget), build("full")])[0],
    )
    if results is None:
        return
    one_pass, two_pass = results
    assert two_pass.report.shared_full_cache and not one_pass.report.shared_full_cache
    assert_same_compression(one_pass, two_pass)


@SETTINGS
@given(
    method=st.sampled_from(METHODS),
    arch=st.sampled_from(ARCHS),
    length=st.integers(40, 120),
    chunk=st.integers(7, 64),
    budget=st.sampled_from([0.25, 40]),
)
def test_chunked_prefill_keeps_what_an_unchunked_prefill_keeps(method, arch, length, chunk, budget):
    model = _model(arch, torch.float64)  # chunks sum attention in another order: keep near-ties out of reach
    ids = random_ids(length, seed=chunk)
    results = both_or_neither(
        lambda: _pipeline(method, budget).prefill(model, ids),
        lambda: _pipeline(method, budget).prefill(model, ids, chunk_size=chunk),
    )
    if results is None:
        return
    whole, chunked = results
    assert chunked.report.chunk_size == chunk
    assert_same_compression(chunked, whole, atol=1e-4)  # chunked attention sums in another order


def _row_bytes(model) -> int:
    """Key + value bytes of one token in one layer (batch 1, float32)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_key_value_heads * head_dim * 4


@SETTINGS
@given(
    method=st.sampled_from(METHODS),
    arch=st.sampled_from(ARCHS),
    length=st.integers(40, 160),
    budget=st.sampled_from([0.3, 40]),
)
def test_peak_cache_bytes_stay_within_kept_plus_one_layer_plus_appended_rows(method, arch, length, budget):
    model = _model(arch)
    pipeline = _pipeline(method, budget)
    try:
        report = pipeline.prefill(model, random_ids(length, seed=3)).report
    except ConfigError:  # more protected tokens than a small budget holds: refused, nothing held
        return
    appended = pipeline.window.plan(random_ids(length), None).n_appended
    bound = report.cache_bytes_after + (length + appended) * _row_bytes(model)
    assert report.cache_bytes_after <= report.peak_cache_bytes <= bound
    assert report.cache_bytes_before >= report.cache_bytes_after


@pytest.mark.parametrize("method", ["snapkv", "dapq", "dapq_plus", "pyramidkv", "ada_dapq", "h2o"])
def test_a_small_budget_peaks_far_below_the_uncompressed_cache(method):
    model = tiny_model("llama", num_hidden_layers=8)
    report = build(method, budget="10%").prefill(model, random_ids(400)).report
    # 8 layers at 10% + one layer's full keys/values + 32 appended rows: about 0.23 of the full cache
    assert report.peak_cache_bytes < 0.3 * report.cache_bytes_before


def test_peak_of_an_uncompressed_prefill_is_the_whole_cache():
    model = _model("llama")
    report = build("full").prefill(model, random_ids(64)).report
    assert report.peak_cache_bytes == report.cache_bytes_before == report.cache_bytes_after
    assert report.cache_bytes_before == 4 * 64 * _row_bytes(model)


def test_cache_bytes_before_counts_what_an_uncompressed_prefill_holds():
    model = _model("gemma3")  # sliding layers hold only their window
    ids = random_ids(80)
    full = build("full").prefill(model, ids)
    compressed = build("dapq", budget=8).prefill(model, ids)
    assert compressed.report.cache_bytes_before == full.cache.nbytes()
    assert compressed.report.cache_bytes_after == compressed.cache.nbytes() < full.cache.nbytes()


@pytest.mark.parametrize("method", ["snapkv", "dapq", "critical_dapq", "ada_snapkv", "pyramidkv", "expected_attention"])
def test_prefill_many_shares_scores_across_budgets_and_keeps_what_each_keeps_alone(method):
    model = _model("llama")
    ids = random_ids(200, batch=2, seed=5)
    budgets = ["20%", "40%", 50]
    shared = prefill_many(model, ids, [build(method, budget=b) for b in budgets])
    for budget, result in zip(budgets, shared, strict=True):
        alone = build(method, budget=budget).prefill(model, ids)
        assert_same_compression(result, alone)
        assert result.report.peak_cache_bytes >= result.report.cache_bytes_before


def test_a_failing_layer_names_itself_and_returns_no_cache():
    model = _model("llama")
    pipeline = build("dapq", budget=4, selector={"sinks": 3, "recent": 3})  # 6 protected > 4 kept
    with pytest.raises(ConfigError, match="protected") as raised:
        pipeline.prefill(model, random_ids(40))
    assert any("layer 0" in note for note in raised.value.__notes__)
    assert pipeline.last_report is None


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_chunk_size_must_be_a_positive_int(bad):
    with pytest.raises(ConfigError, match="chunk_size"):
        build("dapq", budget=8).prefill(_model("llama"), random_ids(20), chunk_size=bad)


def test_row_chunked_modules_are_put_back_also_when_the_prefill_raises():
    model = _model("llama")
    mlps = [layer.mlp for layer in model.model.layers]
    build("dapq", budget=8).prefill(model, random_ids(40), chunk_size=8)
    assert [layer.mlp for layer in model.model.layers] == mlps
    with pytest.raises(ConfigError):
        build("dapq", budget=4, selector={"sinks": 3, "recent": 3}).prefill(model, random_ids(40), chunk_size=8)
    assert [layer.mlp for layer in model.model.layers] == mlps


def test_prefill_many_gives_a_hidden_state_scorer_the_prompt_rows_even_when_its_window_comes_later():
    """Expected Attention reads the prompt's attention inputs; with an appended window in ``prefill_many`` its
    layers are scored in the second forward, so the prompt rows are kept from the first (``reads_hidden_states``)."""
    model = _model("llama")
    ids = random_ids(120, seed=4)
    pipeline = build("expected_attention", budget=30, window="pseudo")
    shared, _ = prefill_many(model, ids, [pipeline, build("snapkv", budget=40)])
    assert_same_compression(shared, build("expected_attention", budget=30, window="pseudo").prefill(model, ids))
