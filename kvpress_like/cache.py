"""A DynamicCache whose layers may hold fewer entries than the tokens they have seen.

After eviction a layer's *physical* length (rows held) is shorter than its *logical* length (tokens
seen). ``get_seq_length`` reports the logical length, so models and ``generate`` give new tokens the
positions L, L+1, … and never re-feed evicted tokens; ``get_query_offset`` reports the physical
length, which is what attention masks index.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class CompressedCache(DynamicCache):
    """DynamicCache with per-layer eviction bookkeeping (logical = physical + evicted)."""

    def __init__(self, config):
        super().__init__(config=config)
        self.evicted: dict[int, int] = {}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx) + self.evicted.get(layer_idx, 0)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx)

    def physical_length(self, layer_idx: int) -> int:
        return super().get_seq_length(layer_idx)

    def replace_layer(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, seen: int) -> None:
        """Hold ``keys``/``values`` for a layer that has seen ``seen`` tokens."""
        layer = self.layers[layer_idx]
        layer.keys, layer.values = keys, values
        layer.is_initialized, layer.device = True, keys.device
        self.evicted[layer_idx] = seen - keys.shape[-2]

    def nbytes(self) -> int:
        """Bytes of key and value tensors really held."""
        return sum(
            t.numel() * t.element_size()
            for layer in self.layers
            for t in (layer.keys, layer.values)
            if isinstance(t, torch.Tensor)
        )
