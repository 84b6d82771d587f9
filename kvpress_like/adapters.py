"""Model adapters: find the attention layers and recompute post-RoPE window queries.

Supported: Llama, Mistral, Qwen2, Qwen3 (QK-norm), Phi3 (fused qkv, partial rotary) and Gemma3
(QK-norm; only global-attention layers are compressed, sliding-window layers stay untouched).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress_like.errors import UnsupportedModelError

SUPPORTED_MODEL_TYPES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "phi3": "Phi3",
    "gemma3_text": "Gemma3 (text)",
    "gemma3": "Gemma3",
}


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


def project_queries(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE queries ``[batch, q_heads, rows, head_dim]`` (after QK-norm where the model has one)."""
    batch, rows, _ = hidden_states.shape
    head_dim = module.head_dim
    q_heads = module.config.num_attention_heads
    if hasattr(module, "q_proj"):
        queries = module.q_proj(hidden_states)
    else:  # Phi3: fused projection, queries come first
        queries = module.qkv_proj(hidden_states)[..., : q_heads * head_dim]
    queries = queries.view(batch, rows, q_heads, head_dim)
    if getattr(module, "q_norm", None) is not None:
        queries = module.q_norm(queries)
    return queries.transpose(1, 2)


def window_queries(
    module: torch.nn.Module, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Post-RoPE queries ``[batch, q_heads, rows, head_dim]`` of the attention ``module`` for these rows."""
    return apply_rope(project_queries(module, hidden_states), cos, sin)


@dataclass
class ModelAdapter:
    """The decoder layers of a supported model."""

    model: torch.nn.Module

    @property
    def decoder(self) -> torch.nn.Module:
        inner = self.model.model
        return getattr(inner, "language_model", inner)

    def attention_modules(self) -> list[torch.nn.Module]:
        return [layer.self_attn for layer in self.decoder.layers]

    def rope_at(self, module: torch.nn.Module, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[1, n, rot_dim]`` of ``module``'s rotary embedding at ``positions``."""
        rotary = self.decoder.rotary_emb
        probe = torch.zeros(1, dtype=module.o_proj.weight.dtype, device=positions.device)
        if isinstance(getattr(rotary, "rope_type", None), dict):  # Gemma3: one rotary embedding per layer type
            return rotary(probe, positions[None], module.layer_type)
        return rotary(probe, positions[None])


def get_adapter(model: torch.nn.Module) -> ModelAdapter:
    """The adapter for ``model``, or :class:`UnsupportedModelError` naming what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(sorted(set(SUPPORTED_MODEL_TYPES.values())))
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type!r}) is not supported; "
            f"supported architectures: {supported}"
        )
    return ModelAdapter(model)
