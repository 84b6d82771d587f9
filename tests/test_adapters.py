"""Architecture adapters are registered plugins: the built-ins reproduce each model's own attention, and a
new family is one registration away (Granite, below, needs no override at all)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from conftest import ARCHITECTURES, full_attention_layers, random_ids, tiny_model

from kvpress_like import DuplicateRegistrationError, ModelAdapter, UnsupportedModelError, build, hookimpl
from kvpress_like.adapters import BUILTIN_ADAPTERS, Qwen3Adapter
from kvpress_like.cache import CompressedCache
from kvpress_like.plugins import (
    get_adapter,
    get_registry,
    register_plugin,
    supported_model_types,
    unregister_plugin,
    window_queries,
)
from kvpress_like.testing import attention_mismatch, make_gpt2, make_model

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


class GraniteAdapter(ModelAdapter):
    """Granite: Llama's attention with its own scaling (``attention_multiplier``), read from ``module.scaling``."""

    name = "test_granite"
    label = "Granite"
    model_types = ("granite",)
    tiny_config: ClassVar[dict[str, Any]] = {
        "num_attention_heads": 4, "num_key_value_heads": 2, "attention_multiplier": 0.3,
    }


class Registers:
    def __init__(self, *adapters: type[ModelAdapter]):
        self.adapters = list(adapters)

    @hookimpl
    def register_adapters(self):
        return self.adapters


@pytest.fixture
def granite():
    plugin = Registers(GraniteAdapter)
    register_plugin(plugin, name="granite-plugin")
    try:
        yield plugin
    finally:
        unregister_plugin(plugin)


def test_the_builtins_are_registered_by_name_and_model_type():
    registry = get_registry()
    assert list(ARCHITECTURES) == [cls.name for cls in BUILTIN_ADAPTERS]
    assert set(registry.adapters) == {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "gemma3_text"}
    assert registry.owners[("model_type", "gemma3_text")] == "kvpress_like.adapters"
    assert supported_model_types()["gemma3_text"] == "Gemma3"


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_recomputed_queries_give_the_model_own_attention(arch):
    assert attention_mismatch(arch) < 1e-5


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_the_reference_catches_a_missing_query_norm(arch):
    assert attention_mismatch(arch, adapter=ModelAdapter) > 1e-2  # Llama's projection skips their QK-norm


def test_module_functions_dispatch_on_the_module_model_type():
    model = tiny_model("qwen3")
    module = get_adapter(model).attention_modules()[0]
    hidden = torch.randn(1, 5, model.config.hidden_size)
    cos, sin = get_adapter(model).rope_at(module, torch.arange(5))
    queries = window_queries(module, hidden, cos, sin)
    assert torch.equal(queries, Qwen3Adapter.window_queries(module, hidden, cos, sin))
    assert not torch.allclose(queries, ModelAdapter.window_queries(module, hidden, cos, sin))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_compressible_layers_are_those_the_pipeline_compresses(arch):
    model = tiny_model(arch)
    layers = get_adapter(model).compressible_layers()
    assert layers == full_attention_layers(model)
    assert sorted(build("dapq", budget=4).prefill(model, random_ids(24)).report.layers) == layers
    assert layers == [i for i, layer in enumerate(CompressedCache(model.config).layers) if not layer.is_sliding]


def test_unsupported_model_names_every_registered_model_type():
    with pytest.raises(UnsupportedModelError) as info:
        get_adapter(make_gpt2())
    message = str(info.value)
    assert "GPT2LMHeadModel (model_type='gpt2') is not supported" in message
    assert "Gemma3 (gemma3, gemma3_text)" in message and "Llama (llama)" in message and "Phi3 (phi3)" in message
    assert "Adding an architecture" in message


def test_a_family_registered_at_run_time_is_supported_and_tested_like_the_builtins(granite):
    from kvpress_like.testing import ARCHITECTURES as current

    assert "test_granite" in current
    model = make_model("test_granite", attn_implementation="eager")
    assert type(model).__name__ == "GraniteForCausalLM" and isinstance(get_adapter(model), GraniteAdapter)
    assert model.model.layers[0].self_attn.scaling == 0.3
    assert attention_mismatch("test_granite") < 1e-5
    report = build("dapq", budget=8).prefill(model, random_ids(40)).report
    assert all(kept.shape == (1, 2, 8) for kept in report.kept_indices.values())


def test_unregistering_the_family_makes_it_unsupported_again(granite):
    model = make_model("test_granite")
    assert get_adapter(model)
    unregister_plugin(granite)
    with pytest.raises(UnsupportedModelError, match="model_type='granite'"):
        get_adapter(model)


def test_two_adapters_for_one_model_type_are_named_in_the_error():
    class Other(ModelAdapter):
        name, label, model_types = "other_llama", "Other Llama", ("llama",)

    plugin = Registers(Other)
    register_plugin(plugin, name="llama-again")
    try:
        with pytest.raises(DuplicateRegistrationError) as info:
            get_adapter(tiny_model("llama"))
        message = str(info.value)
        assert "model type 'llama' is registered twice" in message
        assert "'kvpress_like.adapters'" in message and "'llama-again'" in message
    finally:
        unregister_plugin(plugin)
    assert type(get_adapter(tiny_model("llama"))).__name__ == "LlamaAdapter"


@pytest.mark.parametrize(
    ("registered", "match"),
    [(dict, "not a ModelAdapter subclass"), (type("Nameless", (ModelAdapter,), {}), "does not set name, label")],
)
def test_registering_a_broken_adapter_is_a_type_error(registered, match):
    plugin = Registers(registered)
    register_plugin(plugin, name="broken-adapter")
    try:
        with pytest.raises(TypeError, match=match):
            get_registry()
    finally:
        unregister_plugin(plugin)
