"""Cache layers whose (sequence, KV head) pairs kept different numbers of rows, stored without padding.

A :class:`RaggedLayer` holds one ``[n, head_dim]`` tensor per (sequence, KV head) for the kept prompt rows
(head-adaptive budgets, Ada-KV; or a padded batch whose sequences keep their own budgets), so the bytes
held are exactly the kept entries. Rows added afterwards (a question, decoded tokens) go to every head of
every sequence alike and are stored densely, ``[batch, kv_heads, n_new, head_dim]``. For attention the
layer lays its rows out densely for one step, kept rows padded on the left
(:meth:`RaggedLayer.padded`), and :mod:`kvpress_like.attention` masks the padding.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin


class RaggedLayer(CacheLayerMixin):
    """A full-attention cache layer whose (sequence, head) pairs hold different numbers of kept rows."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, keys: list[list[torch.Tensor]], values: list[list[torch.Tensor]]):
        super().__init__()
        self.key_parts, self.value_parts = keys, values
        self.is_initialized = True
        self.device = keys[0][0].device
        batch, heads, dim = len(keys), len(keys[0]), keys[0][0].shape[-1]
        self.tail_keys = keys[0][0].new_zeros(batch, heads, 0, dim)
        self.tail_values = values[0][0].new_zeros(batch, heads, 0, values[0][0].shape[-1])

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Never needed: a ragged layer is built from kept entries."""

    @property
    def lengths(self) -> torch.Tensor:
        """Kept prompt rows per (sequence, KV head), ``[batch, kv_heads]``."""
        return torch.tensor([[part.shape[0] for part in row] for row in self.key_parts])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append rows to every (sequence, head); new tensors, so a shallow copy of the layer never sees them."""
        self.tail_keys = torch.cat([self.tail_keys, key_states], dim=-2)
        self.tail_values = torch.cat([self.tail_values, value_states], dim=-2)
        return self.padded()

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[batch, kv_heads, T, head_dim]``: kept rows left-padded, then the rows added since."""
        return _left_padded(self.key_parts, self.tail_keys), _left_padded(self.value_parts, self.tail_values)

    def valid_rows(self) -> torch.Tensor:
        """``[batch, kv_heads, T]``: which rows of :meth:`padded` are real (not left padding)."""
        lengths = self.lengths.to(self.tail_keys.device)
        width = int(lengths.max())
        kept = torch.arange(width, device=lengths.device) >= (width - lengths)[..., None]
        added = torch.ones(*lengths.shape, self.tail_keys.shape[-2], dtype=torch.bool, device=lengths.device)
        return torch.cat([kept, added], dim=-1)

    def get_seq_length(self) -> int:
        return int(self.lengths.max()) + self.tail_keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        parts = (self.key_parts, self.value_parts)
        kept = sum(t.numel() * t.element_size() for rows in parts for row in rows for t in row)
        return kept + sum(t.numel() * t.element_size() for t in (self.tail_keys, self.tail_values))


def _left_padded(parts: list[list[torch.Tensor]], tail: torch.Tensor) -> torch.Tensor:
    """``[batch, heads, max_rows + tail_rows, dim]``: each (sequence, head)'s kept rows right-aligned before
    ``tail``, zeros before them; written once into one new tensor."""
    width = max(part.shape[0] for row in parts for part in row)
    out = tail.new_zeros(*tail.shape[:2], width + tail.shape[-2], tail.shape[-1])
    for b, row in enumerate(parts):
        for h, part in enumerate(row):
            out[b, h, width - part.shape[0] : width] = part
    out[:, :, width:] = tail
    return out
