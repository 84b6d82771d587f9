"""Tiny random-init models of every supported architecture, for tests, property checks and plugins.

They are built from configs (no download) in milliseconds: ``make_model("qwen3", attn_implementation="eager")``.
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=4096)

ARCHITECTURES = {
    "llama": (LlamaForCausalLM, LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
    "mistral": (
        MistralForCausalLM, MistralConfig, dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=None)
    ),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "phi3": (Phi3ForCausalLM, Phi3Config, dict(num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)),
    "gemma3": (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, num_hidden_layers=3,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=16),
    ),
}


def make_model(arch: str = "llama", attn_implementation: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random-init causal LM of the given architecture, in eval mode."""
    model_cls, config_cls, specific = ARCHITECTURES[arch]
    config = config_cls(**{**COMMON, **specific, **overrides})
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return model_cls(config).eval()


def make_gpt2() -> torch.nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4)).eval()
