"""A DynamicCache whose layers may hold fewer entries than the tokens they have seen.

After eviction a layer's *physical* length (rows held) is shorter than its *logical* length (tokens
seen). ``get_seq_length`` reports the logical length, so models and ``generate`` give new tokens the
positions L, L+1, … and never re-feed evicted tokens; ``get_query_offset`` reports the physical
length, which is what attention masks index.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from kvpress_like.errors import UnsupportedInputError
from kvpress_like.ragged import RaggedLayer


class CompressedCache(DynamicCache):
    """DynamicCache with per-layer eviction bookkeeping (logical = physical + evicted)."""

    def __init__(self, config):
        super().__init__(config=config)
        self.evicted: dict[int, int] = {}
        self.peak_nbytes = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """DynamicCache's update, noting the bytes held afterwards (the peak of a prefill is read from here)."""
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes())
        return out

    def drop_trailing_rows(self, layer_idx: int, rows: int) -> None:
        """Forget the last ``rows`` entries of an uncompressed layer (appended window rows), as if never fed.

        A sliding-window layer must have recorded its past during that forward (see
        :func:`kvpress_like.compat.record_sliding_past`); it is then cut back to its window.
        """
        layer = self.layers[layer_idx]
        end = layer.keys.shape[-2] - rows
        if getattr(layer, "is_sliding", False):
            start = max(0, end - layer.sliding_window + 1)
            layer.cumulative_length -= rows
            layer.record_past = False
        else:
            start = 0
        layer.keys, layer.values = layer.keys[:, :, start:end], layer.values[:, :, start:end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx) + self.evicted.get(layer_idx, 0)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx)

    def physical_length(self, layer_idx: int) -> int:
        """Rows held by a layer (the longest head of a ragged layer); sliding layers hold at most a window."""
        layer = self.layers[layer_idx]
        if isinstance(layer, RaggedLayer):
            return layer.get_seq_length()
        return 0 if layer.keys is None or not layer.is_initialized else layer.keys.shape[-2]

    def full_attention_lengths(self) -> list[int]:
        """Physical lengths of the dense full-attention layers (not sliding-window, not ragged)."""
        return [
            self.physical_length(i)
            for i, layer in enumerate(self.layers)
            if not getattr(layer, "is_sliding", False) and not isinstance(layer, RaggedLayer)
        ]

    @property
    def uneven(self) -> bool:
        """True when full-attention layers hold different numbers of rows (per-layer budgets)."""
        return len(set(self.full_attention_lengths())) > 1

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """One mask serves every layer: with uneven layers it is sized for the longest one.

        A one-token step needs no causal pattern, so every layer reads a slice of an all-visible mask.
        Several tokens at once would need a different causal offset per layer: refused, never wrong.
        """
        if not self.uneven or getattr(self.layers[layer_idx], "is_sliding", False) or not self.full_attention_lengths():
            return super().get_mask_sizes(query_length, layer_idx)
        if query_length > 1:
            raise UnsupportedInputError(
                "this compressed cache holds a different number of tokens per layer (per-layer budgets), "
                "so several new tokens cannot share one causal mask; feed them one token at a time "
                "(kvpress_like.prefill.feed does this)"
            )
        return max(self.full_attention_lengths()) + query_length, 0

    def replace_layer(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, seen: int) -> None:
        """Hold ``keys``/``values`` for a layer that has seen ``seen`` tokens."""
        layer = self.layers[layer_idx]
        layer.keys, layer.values = keys, values
        layer.is_initialized, layer.device = True, keys.device
        self.evicted[layer_idx] = seen - keys.shape[-2]
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes())

    def replace_with_ragged(self, layer_idx: int, layer: RaggedLayer, seen: int) -> None:
        """Hold a head-adaptive layer (each KV head its own length) for a layer that has seen ``seen`` tokens."""
        self.layers[layer_idx] = layer
        self.evicted[layer_idx] = seen - layer.get_seq_length()
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes())

    def layer_nbytes(self, layer_idx: int) -> int:
        """Bytes of the key and value tensors one layer really holds."""
        layer = self.layers[layer_idx]
        if isinstance(layer, RaggedLayer):
            return layer.nbytes()
        return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)

    def nbytes(self) -> int:
        """Bytes of key and value tensors really held."""
        return sum(self.layer_nbytes(i) for i in range(len(self.layers)))
