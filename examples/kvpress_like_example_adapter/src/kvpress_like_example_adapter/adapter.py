"""Example kvpress_like plugin: OLMo 2 (``model_type="olmo2"``) as a supported architecture.

OLMo 2's decoder is Llama's but for one thing that matters here: its ``q_norm`` is one RMSNorm over all
query heads together (``q_heads × head_dim`` channels), applied *before* the queries are split into
heads, where Qwen3 and Gemma3 normalise each head on its own. So the adapter overrides only the query
projection; attention layers, RoPE and the compressible layers are the defaults of ``ModelAdapter``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from kvpress_like import ModelAdapter, hookimpl


class Olmo2Adapter(ModelAdapter):
    """OLMo 2: Llama-style layers with a query norm over all heads, before the split into heads."""

    name = "olmo2"  # the column of the compatibility matrix, and make_model("olmo2")
    label = "OLMo 2"  # shown in UnsupportedModelError messages
    model_types = ("olmo2",)  # config.model_type values this adapter handles
    tiny_config: ClassVar[dict[str, Any]] = {"num_attention_heads": 4, "num_key_value_heads": 2}

    @classmethod
    def project_queries(cls, module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, rows, _ = hidden_states.shape
        queries = module.q_norm(module.q_proj(hidden_states))  # one norm over q_heads × head_dim channels
        return queries.view(batch, rows, module.config.num_attention_heads, module.head_dim).transpose(1, 2)


@hookimpl
def register_adapters():
    return [Olmo2Adapter]
