"""The learned scorer and its artifacts: a naive reference, checksums, model fingerprints, shipped artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    NEEDS_SMOLLM2,
    attention_inputs,
    fitted_on,
    naive_prediction,
    random_ids,
    random_surrogate,
    tiny_model,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_like import build
from kvpress_like.errors import ConfigError
from kvpress_like.plugins import get_adapter
from kvpress_like.surrogate import (
    WEIGHTS_FILE,
    load_surrogate,
    module_fingerprint,
    save_surrogate,
    shipped_artifacts,
)


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["linear", "mlp"]), batch=st.integers(1, 2), rows=st.integers(1, 9),
       hidden=st.integers(1, 7), heads=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_predictions_match_a_token_by_token_reference(kind, batch, rows, hidden, heads, seed):
    surrogate = random_surrogate(kind, [0], hidden, heads, seed)
    states = torch.randn(batch, rows, hidden, generator=torch.Generator().manual_seed(seed + 1))
    torch.testing.assert_close(surrogate.predict(0, states), naive_prediction(surrogate, 0, states),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_a_prefill_keeps_the_top_tokens_of_the_reference_scores(tmp_path, kind):
    model = tiny_model("llama", num_key_value_heads=2)
    save_surrogate(fitted_on(model, kind), tmp_path)
    ids = random_ids(48, seed=5)
    pipeline = build("kvzap", budget=12, allocator="uniform", selector={"sinks": 0}, scorer={"artifact": str(tmp_path)})
    report = pipeline.prefill(model, ids).report
    reference = load_surrogate(tmp_path)
    for layer, hidden in attention_inputs(model, ids).items():
        expected = naive_prediction(reference, layer, hidden).topk(12, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(report.kept_indices[layer], expected)


def test_the_artifact_round_trips_and_refuses_changed_weights(tmp_path):
    model = tiny_model("llama")
    surrogate = fitted_on(model)
    save_surrogate(surrogate, tmp_path)
    loaded = load_surrogate(tmp_path)
    for layer, weights in surrogate.layers.items():
        for name, tensor in weights.items():
            assert torch.equal(loaded.layers[layer][name], tensor)
    weights = (tmp_path / WEIGHTS_FILE).read_bytes()
    (tmp_path / WEIGHTS_FILE).write_bytes(weights[:-4] + bytes(4))  # the last float of the last tensor changed
    with pytest.raises(ConfigError, match="checksum"):
        load_surrogate(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(weights)
    meta = json.loads((tmp_path / "surrogate.json").read_text())
    meta["format"] = "kvpress_like.surrogate/0"
    (tmp_path / "surrogate.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="format"):
        load_surrogate(tmp_path)


def test_a_surrogate_of_another_model_is_refused(tmp_path):
    save_surrogate(fitted_on(tiny_model("llama", seed=0)), tmp_path)
    other = tiny_model("llama", seed=1)  # same shapes, other weights
    pipeline = build("kvzap", budget=8, scorer={"artifact": str(tmp_path)})
    with pytest.raises(ConfigError, match="fingerprints differ"):
        pipeline.prefill(other, random_ids(32))
    wider = tiny_model("llama", hidden_size=96)
    with pytest.raises(ConfigError, match="hidden states of size"):
        build("kvzap", budget=8, scorer={"artifact": str(tmp_path)}).prefill(wider, random_ids(32))


def test_a_missing_artifact_names_what_is_valid(tmp_path):
    with pytest.raises(ConfigError, match="train-scorer"):
        build("kvzap", budget=8, scorer={"artifact": str(tmp_path / "nothing")}).prefill(tiny_model(), random_ids(16))
    with pytest.raises(ConfigError, match="no shipped 'kvzip' surrogate was fitted on this model"):
        build("kvzap", budget=8).prefill(tiny_model(), random_ids(16))


def test_the_learned_scorer_is_refused_where_hidden_states_are_missing(tmp_path):
    save_surrogate(fitted_on(tiny_model()), tmp_path)
    with pytest.raises(ConfigError, match="decode-time event"):
        build("kvzap", budget=8, allocator="uniform", scorer={"artifact": str(tmp_path)},
              decoding={"interval": 4, "target": 8})


def test_the_fingerprint_ignores_the_load_dtype():
    module = get_adapter(tiny_model()).attention_modules()[0]
    before = module_fingerprint(module)
    assert module_fingerprint(module.to(torch.bfloat16)) == before
    module.to(torch.float32)


@NEEDS_SMOLLM2
@pytest.mark.model
def test_the_shipped_smollm2_artifacts_fit_smollm2(smollm2):
    model, tokenizer = smollm2
    names = shipped_artifacts()
    assert {"smollm2-135m-kvzip", "smollm2-135m-dapq"} <= set(names)
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 12, return_tensors="pt").input_ids
    for method in ("kvzap", "dapq_distilled"):
        report = build(method, budget=0.5).prefill(model, ids).report
        assert abs(report.kept_fraction - 0.5) < 0.02
    for name in names:
        surrogate = load_surrogate(name)
        assert (Path(surrogate.source) / WEIGHTS_FILE).is_file() and surrogate.source.endswith(name)
        assert surrogate.meta["metrics"] and surrogate.meta["teacher"]["family"] in ("kvzip", "dapq")
