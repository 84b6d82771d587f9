"""Head-adaptive caches without padding: each KV head of each sequence keeps its own number of rows.

A :class:`RaggedLayer` stores one ``[n, head_dim]`` tensor per (sequence, KV head), so the bytes held
are exactly the kept entries (Ada-KV's memory saving, which mask-based implementations only simulate).
Attention over it is computed by the function registered with transformers' ``AttentionInterface`` as
``"kvpress_like_ragged"``: one SDPA call per (sequence, KV head) with a bottom-right causal mask; layers
that are not ragged are delegated to the ordinary SDPA path. Decoding from such a cache must run inside
``with ragged_attention(model):`` (the pipeline's own decoding does this; the model's previous attention
implementation is restored on exit, also on errors).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvpress_like.errors import UnsupportedModelError

RAGGED_ATTENTION = "kvpress_like_ragged"


class RaggedKV:
    """Keys (or values) of one layer: ``parts[b][h]`` is a ``[n_bh, head_dim]`` tensor."""

    def __init__(self, parts: list[list[torch.Tensor]]):
        self.parts = parts

    def __getattr__(self, name: str):
        raise UnsupportedModelError(
            "this cache layer holds head-adaptive (ragged) entries that only the 'kvpress_like_ragged' attention "
            "can read; decode inside `with kvpress_like.ragged_attention(model):` (Pipeline.generate does this)"
        )


class RaggedLayer(CacheLayerMixin):
    """A full-attention cache layer whose (sequence, head) pairs hold different numbers of rows."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, keys: list[list[torch.Tensor]], values: list[list[torch.Tensor]]):
        super().__init__()
        self.key_parts, self.value_parts = keys, values
        self.is_initialized = True
        self.device = keys[0][0].device

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Never needed: a ragged layer is built from kept entries."""

    @property
    def lengths(self) -> torch.Tensor:
        """Rows held per (sequence, KV head), ``[batch, kv_heads]``."""
        return torch.tensor([[part.shape[0] for part in row] for row in self.key_parts])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append one row per (sequence, head); new lists, so a shallow copy of the layer never sees it."""
        self.key_parts = _appended(self.key_parts, key_states)
        self.value_parts = _appended(self.value_parts, value_states)
        return RaggedKV(self.key_parts), RaggedKV(self.value_parts)

    def get_seq_length(self) -> int:
        return int(self.lengths.max())

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        parts = (self.key_parts, self.value_parts)
        return sum(t.numel() * t.element_size() for rows in parts for row in rows for t in row)


def _appended(parts: list[list[torch.Tensor]], states: torch.Tensor) -> list[list[torch.Tensor]]:
    return [[torch.cat([part, states[b, h]], dim=0) for h, part in enumerate(row)] for b, row in enumerate(parts)]


def _bottom_right_causal(q_length: int, kv_length: int, device) -> torch.Tensor:
    """``[q, kv]`` bool: query i (the i-th of the last ``q_length`` rows) sees keys up to its own row."""
    rows = torch.arange(q_length, device=device)[:, None]
    return torch.arange(kv_length, device=device)[None, :] <= kv_length - q_length + rows


def ragged_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA per (sequence, KV head) for ragged layers; the ordinary SDPA path for every other layer."""
    if not isinstance(key, RaggedKV):
        if attention_mask is not None and attention_mask.shape[-1] != key.shape[2]:
            # the shared mask was sized for a ragged layer; without padding this layer needs plain causality
            attention_mask = _bottom_right_causal(query.shape[2], key.shape[2], query.device)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, q_heads, q_length, _ = query.shape
    group = q_heads // len(key.parts[0])
    outputs = []
    for b in range(batch):
        heads = []
        for h, (k, v) in enumerate(zip(key.parts[b], value.parts[b], strict=True)):
            visible = _bottom_right_causal(q_length, k.shape[0], query.device)
            q = query[b, h * group : (h + 1) * group]
            heads.append(
                F.scaled_dot_product_attention(
                    q, k.expand(group, -1, -1), v.expand(group, -1, -1), attn_mask=visible, scale=scaling
                )
            )
        outputs.append(torch.cat(heads, dim=0))
    return torch.stack(outputs).transpose(1, 2).contiguous(), None


AttentionInterface.register(RAGGED_ATTENTION, ragged_attention_forward)
AttentionMaskInterface.register(RAGGED_ATTENTION, sdpa_mask)


def has_ragged_layers(cache) -> bool:
    return any(isinstance(layer, RaggedLayer) for layer in cache.layers)


@contextmanager
def ragged_attention(model, cache=None):
    """Run the model with the ragged-aware attention; its previous implementation is restored on exit.

    With a ``cache`` that holds no ragged layer this does nothing.
    """
    if cache is not None and not has_ragged_layers(cache):
        yield model
        return
    previous = model.config._attn_implementation
    model.set_attn_implementation(RAGGED_ATTENTION)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
