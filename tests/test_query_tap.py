"""The one-pass prefill scores with the queries of the model's own attention call (``kvpress_like.query_tap``).

* the tapped queries are the adapter's recomputed post-RoPE queries, up to rounding, for every architecture;
* a one-pass prefill never projects its window again, and keeps what the recomputing path keeps;
* the tap is removed and the attention implementation restored, on success and on error;
* a model whose attention cannot be wrapped runs untapped.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from types import SimpleNamespace

import pytest
import torch
from conftest import random_ids, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_one_pass import assert_same_compression

import kvpress_like.compressor as compressor
import kvpress_like.prefill as prefill
from kvpress_like import build
from kvpress_like.adapters import get_adapter, window_queries
from kvpress_like.attention import COMPRESSED_ATTENTION, QUERY_TAP, restore_attention
from kvpress_like.errors import ConfigError
from kvpress_like.query_tap import tapped_queries

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

ARCHS = ["llama", "qwen3", "gemma3", "phi3"]
WINDOWED = ["snapkv", "dapq", "dapq_plus", "tova", "pyramidkv", "ada_snapkv", "expected_attention"]


@functools.cache
def _model(arch: str, attn_implementation: str = "sdpa"):
    overrides = {} if arch == "gemma3" else {"num_hidden_layers": 3}
    return copy.deepcopy(tiny_model(arch, attn_implementation, initializer_range=0.1, **overrides))


@contextlib.contextmanager
def _untapped():
    """Prefills as they ran before the tap: every window projected again through the adapter."""
    original = prefill.tapped_queries
    prefill.tapped_queries = lambda *args: contextlib.nullcontext(None)
    try:
        yield
    finally:
        prefill.tapped_queries = original


@contextlib.contextmanager
def _projecting_refused():
    original = compressor.window_queries

    def refuse(*args):
        raise AssertionError("the window's queries were projected again although the attention call tapped them")

    compressor.window_queries = refuse
    try:
        yield
    finally:
        compressor.window_queries = original


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rows", [slice(5, 12), torch.tensor([0, 3, 11, 4])])
def test_tapped_queries_are_the_adapters_post_rope_queries(arch, rows):
    model = _model(arch)
    adapter = get_adapter(model)
    modules = adapter.attention_modules()
    inputs = {}

    def keep_inputs(module, args, kwargs):
        inputs[module.layer_idx] = (kwargs["hidden_states"], *kwargs["position_embeddings"])

    handles = [m.register_forward_pre_hook(keep_inputs, with_kwargs=True) for m in modules]
    try:
        with tapped_queries(model, modules, rows) as tap, torch.no_grad():
            model(random_ids(16, seed=2))
    finally:
        for handle in handles:
            handle.remove()
    for module in modules:
        hidden, cos, sin = inputs[module.layer_idx]
        expected = window_queries(module, hidden[:, rows], cos[:, rows], sin[:, rows])
        torch.testing.assert_close(tap.pop(module.layer_idx), expected, rtol=1e-5, atol=1e-6)
    assert not tap.taken


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(WINDOWED),
    arch=st.sampled_from(ARCHS),
    attention=st.sampled_from(["sdpa", "eager"]),
    length=st.integers(60, 110),
    budget=st.integers(36, 56),  # dapq_plus protects 36 tokens, the SnapKV family 32
)
def test_a_one_pass_prefill_scores_with_the_tapped_queries_and_keeps_what_recomputing_keeps(
    method, arch, attention, length, budget
):
    model = _model(arch, attention)
    ids = random_ids(length, seed=length)
    with _untapped():
        recomputed = build(method, budget=budget).prefill(model, ids)
    with _projecting_refused():
        tapped = build(method, budget=budget).prefill(model, ids)
    assert_same_compression(recomputed, tapped)


@pytest.mark.parametrize(("budget", "tapped"), [(100, 0), (10, 3)])
def test_only_the_layers_that_are_scored_are_tapped(budget, tapped):
    model = _model("llama")
    attached = []
    original = prefill.tapped_queries

    def spy(model, modules, rows):
        attached.extend(modules)
        return original(model, modules, rows)

    prefill.tapped_queries = spy
    try:
        build("dapq", budget=budget).prefill(model, random_ids(40))
    finally:
        prefill.tapped_queries = original
    assert len(attached) == tapped  # 3 layers, each scored when the budget is below the prompt's 40 tokens


@pytest.mark.parametrize("fail", [False, True])
def test_the_tap_and_the_attention_implementation_are_restored(fail):
    model = _model("llama")
    restore_attention(model)  # an earlier test's prefill may have handed the model the kvpress_like attention
    modules = get_adapter(model).attention_modules()
    assert model.config._attn_implementation == "sdpa"
    if fail:
        with pytest.raises(ConfigError):
            build("snapkv", budget=4, selector={"sinks": 3, "recent": 3}).prefill(model, random_ids(40))
    else:
        build("dapq", budget=10).prefill(model, random_ids(40))
    assert not any(hasattr(module, QUERY_TAP) for module in modules)
    # a pruned cache is handed over with the attention that masks it; a failed prefill leaves the model as it was
    assert model.config._attn_implementation == ("sdpa" if fail else COMPRESSED_ATTENTION)
    restore_attention(model)


def test_a_model_whose_attention_cannot_be_wrapped_is_not_tapped():
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    module = torch.nn.Linear(1, 1)
    with tapped_queries(model, [module], slice(0, 1)) as tap:
        assert tap is None
        assert not hasattr(module, QUERY_TAP)
