"""The per-layer allocators of kvpress's PerLayerCompressionPress and LUKVPress: ``layer_ratios`` (an explicit
compression ratio per layer) and ``budget_curve`` (budgets proportional to a curve read from a file), each
against a naive reference of its budgets and through a real prefill."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import random_ids, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpress_like import build
from kvpress_like.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_threaded_torch")
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LAYERS = 4


def _model():
    return tiny_model("llama", num_hidden_layers=LAYERS, initializer_range=0.1)


def _curve(tmp_path, weights, model="tiny-llama"):
    path = tmp_path / "curve.json"
    path.write_text(json.dumps({"model": model, "layer_weights": weights}))
    return str(path)


def curve_reference(weights: list[float], length: int, budget: int) -> list[int]:
    """Shares n·B·w_i/Σw, floors, the missing tokens to the largest remainders, then capped at L with the excess
    handed one token at a time to the largest layer still below L."""
    total = len(weights) * budget
    exact = [total * w / sum(weights) for w in weights]
    shares = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - shares[i], reverse=True)[: total - sum(shares)]:
        shares[i] += 1
    excess = sum(max(0, s - length) for s in shares)
    shares = [min(s, length) for s in shares]
    while excess and any(s < length for s in shares):
        largest = max((i for i in range(len(shares)) if shares[i] < length), key=lambda i: (shares[i], -i))
        shares[largest] += 1
        excess -= 1
    return shares


def _assert_each_layer_as_uniform(method: str, result, ids, budgets: list[int], **overrides):
    """Layer i keeps exactly what the method keeps with a uniform budget of budgets[i]: the allocator only
    changes how many tokens each layer keeps."""
    for layer, budget in enumerate(budgets):
        assert result.report.layers[layer].budget == budget
        uniform = build(method, budget=budget, **overrides).prefill(_model(), ids).report
        assert torch.equal(result.report.layers[layer].kept_indices, uniform.layers[layer].kept_indices)


def test_layer_ratios_keep_the_floor_of_each_layers_share():
    ratios = [0.5, 0.25, 0.625, 0.0]
    ids = random_ids(101, seed=2)
    result = build("snapkv", allocator={"name": "layer_ratios", "compression_ratios": ratios}).prefill(_model(), ids)
    budgets = [int(101 * (1 - r)) for r in ratios]
    assert budgets == [50, 75, 37, 101]
    _assert_each_layer_as_uniform("snapkv", result, ids, budgets)


def test_layer_ratios_refuse_a_list_that_does_not_match_the_layers():
    pipeline = build("keydiff", allocator={"name": "layer_ratios", "compression_ratios": [0.5, 0.5]})
    with pytest.raises(ConfigError, match="2 compression ratios but the model has 4 compressed layers"):
        pipeline.prefill(_model(), random_ids(64))


@pytest.mark.parametrize("ratios", [[1.0], [-0.1, 0.5], []])
def test_layer_ratios_refuse_ratios_outside_zero_one(ratios):
    with pytest.raises(ConfigError, match="compression_ratios"):
        build("keydiff", allocator={"name": "layer_ratios", "compression_ratios": ratios})


def test_budget_curve_shares_follow_the_file(tmp_path):
    weights = [4.0, 2.0, 1.0, 1.0]
    ids = random_ids(120, seed=5)
    pipeline = build("keydiff", budget=40, allocator={"name": "budget_curve", "path": _curve(tmp_path, weights)})
    result = pipeline.prefill(_model(), ids)
    budgets = curve_reference(weights, 120, 40)
    assert budgets == [80, 40, 20, 20]
    _assert_each_layer_as_uniform("keydiff", result, ids, budgets)


def test_budget_curve_reference_on_a_capped_case():
    # shares 96, 48, 24, 24 at L = 90: layer 0 capped, its 6 tokens go to layer 1
    assert curve_reference([4, 2, 1, 1], 90, 48) == [90, 54, 24, 24]


@SETTINGS
@given(weights=st.lists(st.floats(0.05, 20), min_size=1, max_size=8), length=st.integers(1, 300),
       budget=st.integers(0, 300))
def test_budget_curve_matches_its_reference(tmp_path_factory, weights, length, budget):
    path = _curve(tmp_path_factory.mktemp("curve"), weights)
    allocator = build("keydiff", budget=1, allocator={"name": "budget_curve", "path": path}).allocator
    budgets = allocator.layer_budgets(len(weights), length, budget)
    assert budgets == curve_reference(weights, length, budget)
    assert all(0 <= b <= length for b in budgets)
    assert sum(budgets) == min(len(weights) * budget, len(weights) * length)


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "cannot be read as JSON"),
    (json.dumps({"model": "m"}), "needs 'layer_weights'"),
    (json.dumps({"layer_weights": [1.0, 0.0]}), "positive numbers"),
    (json.dumps([1.0, 2.0]), "needs 'layer_weights'"),
])
def test_budget_curve_refuses_a_bad_file(tmp_path, content, message):
    path = tmp_path / "curve.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        build("keydiff", budget=10, allocator={"name": "budget_curve", "path": str(path)})


def test_budget_curve_refuses_a_missing_file_and_a_curve_of_another_depth(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        build("keydiff", budget=10, allocator={"name": "budget_curve", "path": str(tmp_path / "absent.json")})
    pipeline = build("keydiff", budget=10, allocator={"name": "budget_curve", "path": _curve(tmp_path, [1, 2, 3])})
    with pytest.raises(ConfigError, match=r"fitted on tiny-llama\) has 3 layer weights but the model has 4"):
        pipeline.prefill(_model(), random_ids(64))
