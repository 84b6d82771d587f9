"""Architecture adapters: where a model's attention layers are and how they make post-RoPE queries.

An adapter is a plugin like any part: ``register_adapters`` returns :class:`ModelAdapter`
subclasses, and the registry maps every ``config.model_type`` an adapter lists to it. The built-ins:
Llama, Mistral, Qwen2, Qwen3 (QK-norm), Phi3 (fused qkv, partial rotary) and Gemma3 (QK-norm; only
global-attention layers are compressed, sliding-window layers stay untouched).

The lookups over the registry (``get_adapter``, ``adapter_class``, ``supported_model_types``, and
``project_queries`` / ``window_queries``, which dispatch on an attention module's ``config.model_type``) live in
the registry module, :mod:`kvpress_like.plugins`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers import DynamicCache

from kvpress_like.hookspecs import hookimpl


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``[batch, heads, seq, head_dim]`` by ``cos``/``sin`` ``[batch, seq, rot_dim]``.

    Only the first ``rot_dim`` channels rotate (partial rotary, as in Phi3).
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot_dim = cos.shape[-1]
    rotated, passed = x[..., :rot_dim], x[..., rot_dim:]
    return torch.cat([rotated * cos + _rotate_half(rotated) * sin, passed], dim=-1)


class ModelAdapter:
    """How kvpress_like reaches into one model family; the defaults fit a Llama-style decoder.

    A subclass declares ``name`` (short id: a column of the compatibility matrix), ``label`` (shown in
    messages), ``model_types`` (the ``config.model_type`` values it handles) and, optionally,
    ``tiny_config``: config options of a tiny random model of the family (:mod:`kvpress_like.testing`
    builds it for the property tests and the compatibility matrix). It overrides only what its family
    does differently. Query methods are class methods: they need the attention module, not the model.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    tiny_config: ClassVar[dict[str, Any] | None] = None
    qk_norm: ClassVar[bool] = False  # the module normalises each head's queries (``q_norm``) before RoPE

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @property
    def decoder(self) -> torch.nn.Module:
        """The module holding ``layers`` and ``rotary_emb``."""
        inner = self.model.model
        return getattr(inner, "language_model", inner)

    def attention_modules(self) -> list[torch.nn.Module]:
        """The attention module of every decoder layer, in order (each has ``layer_idx``)."""
        return [layer.self_attn for layer in self.decoder.layers]

    def compressible_layers(self) -> list[int]:
        """Indices of the layers a pipeline may compress: every layer whose cache is not a sliding window."""
        layers = DynamicCache(config=self.model.config).layers
        return [i for i, layer in enumerate(layers) if not getattr(layer, "is_sliding", False)]

    def rope_at(self, module: torch.nn.Module, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[1, n, rot_dim]`` of ``module``'s rotary embedding at ``positions``."""
        probe = torch.zeros(1, dtype=module.o_proj.weight.dtype, device=positions.device)
        return self.decoder.rotary_emb(probe, positions[None], *self.rotary_arguments(module))

    def rotary_arguments(self, module: torch.nn.Module) -> tuple:
        """Extra arguments of the decoder's rotary embedding for ``module``'s layer; none by default."""
        return ()

    @classmethod
    def project_queries(cls, module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE queries ``[batch, q_heads, rows, head_dim]`` of ``module`` (after its QK-norm, if any)."""
        batch, rows, _ = hidden_states.shape
        queries = module.q_proj(hidden_states).view(batch, rows, module.config.num_attention_heads, module.head_dim)
        if cls.qk_norm:
            queries = module.q_norm(queries)
        return queries.transpose(1, 2)

    @classmethod
    def window_queries(
        cls, module: torch.nn.Module, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Post-RoPE queries ``[batch, q_heads, rows, head_dim]``, exactly as ``module``'s forward makes them."""
        return apply_rope(cls.project_queries(module, hidden_states), cos, sin)


class LlamaAdapter(ModelAdapter):
    name, label, model_types = "llama", "Llama", ("llama",)
    tiny_config: ClassVar[dict[str, Any]] = {"num_attention_heads": 4, "num_key_value_heads": 2}


class MistralAdapter(ModelAdapter):
    name, label, model_types = "mistral", "Mistral", ("mistral",)
    tiny_config: ClassVar[dict[str, Any]] = {"num_attention_heads": 4, "num_key_value_heads": 1, "sliding_window": None}


class Qwen2Adapter(ModelAdapter):
    name, label, model_types = "qwen2", "Qwen2", ("qwen2",)
    tiny_config: ClassVar[dict[str, Any]] = {"num_attention_heads": 4, "num_key_value_heads": 2}


class Qwen3Adapter(ModelAdapter):
    name, label, model_types = "qwen3", "Qwen3", ("qwen3",)
    tiny_config: ClassVar[dict[str, Any]] = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    qk_norm = True


class Phi3Adapter(ModelAdapter):
    """Phi3: one fused ``qkv_proj`` whose first ``q_heads × head_dim`` outputs are the queries."""

    name, label, model_types = "phi3", "Phi3", ("phi3",)
    tiny_config: ClassVar[dict[str, Any]] = {"num_attention_heads": 4, "num_key_value_heads": 4, "pad_token_id": 0}

    @classmethod
    def project_queries(cls, module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, rows, _ = hidden_states.shape
        q_heads = module.config.num_attention_heads
        queries = module.qkv_proj(hidden_states)[..., : q_heads * module.head_dim]
        return queries.view(batch, rows, q_heads, module.head_dim).transpose(1, 2)


class Gemma3Adapter(ModelAdapter):
    """Gemma3: QK-norm, one rotary embedding per layer type; sliding-window layers are left alone."""

    name, label, model_types = "gemma3", "Gemma3", ("gemma3_text", "gemma3")
    tiny_config: ClassVar[dict[str, Any]] = {
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "num_hidden_layers": 3,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "sliding_window": 16,
    }
    qk_norm = True

    def rotary_arguments(self, module: torch.nn.Module) -> tuple:
        return (module.layer_type,)


BUILTIN_ADAPTERS = (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, Phi3Adapter, Gemma3Adapter)


@hookimpl
def register_adapters():
    return list(BUILTIN_ADAPTERS)


# Transitional: the lookups live in the registry module (kvpress_like.plugins). This re-export keeps the engine's
# imports working until compressor.py, prefill.py, progressive.py, scorers/expected_attention.py and
# tests/test_query_tap.py import them from kvpress_like.plugins; it is the one circle ALLOWED in
# tests/test_import_cycles.py, and both go together.
from kvpress_like.plugins import (  # noqa: E402
    adapter_class,
    get_adapter,
    project_queries,
    supported_model_types,
    window_queries,
)

__all__ = [
    "BUILTIN_ADAPTERS", "ModelAdapter", "adapter_class", "apply_rope", "get_adapter", "project_queries",
    "register_adapters", "supported_model_types", "window_queries",
]
