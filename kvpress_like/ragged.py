"""Cache layers whose (sequence, KV head) pairs kept different numbers of rows.

A :class:`RaggedLayer` is built from one ``[n, head_dim]`` tensor per (sequence, KV head) of kept prompt rows
(head-adaptive budgets, Ada-KV; or a padded batch whose sequences keep their own budgets) and holds them as
given, unpadded, until a row is appended. Rows added afterwards (a question, decoded tokens) go to every head
of every sequence alike. From the first append on, the layer lives in one buffer
``[batch, kv_heads, capacity, head_dim]``: the kept rows right-aligned in the first ``max(lengths)`` columns
(left padding before the shorter heads), then the added rows, then spare columns. An append writes its rows in
place and returns views, so a decode step copies only its new rows; when the spare columns run out the buffer
grows by a quarter (amortised O(1) per row). :mod:`kvpress_like.attention` masks the padding
(:meth:`RaggedLayer.valid_rows`).

Shallow copies (:func:`kvpress_like.prefill.shallow_copy`) share the buffer. A layer writes in place only past
every row any sharer wrote (``_Buffer.filled``); otherwise it copies its own rows to a new buffer first, so no
copy ever sees another's rows and no view handed out earlier ever changes.

Memory: :meth:`RaggedLayer.nbytes` counts the entries held (kept rows and added rows), what the budgets
promise and what the reports and benchmark records call the cache's bytes; the left padding and the spare
capacity of the buffer are not entries. :meth:`RaggedLayer.allocated_nbytes` counts every byte the layer's
tensors take, padding and spare capacity included.

The transformers contract (``CacheLayerMixin``): beam search (``reorder_cache``, ``batch_repeat_interleave``,
``batch_select_indices``), ``offload``/``prefetch`` and ``reset`` are implemented; ``crop`` (assisted
decoding) is refused unless it removes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

from kvpress_like.errors import UnsupportedInputError

SPARE_SHARE = 4  # a buffer that grows gets 1/SPARE_SHARE of its rows (at least MIN_SPARE) as spare columns
MIN_SPARE = 16


@dataclass
class _Buffer:
    """Keys and values ``[batch, kv_heads, capacity, dim]`` shared by a layer and its shallow copies; the first
    ``filled`` columns have been written by one of them."""

    keys: torch.Tensor
    values: torch.Tensor
    filled: int

    @property
    def capacity(self) -> int:
        return self.keys.shape[-2]


class RaggedLayer(CacheLayerMixin):
    """A full-attention cache layer whose (sequence, head) pairs hold different numbers of kept rows."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, key_parts: list[list[torch.Tensor]], value_parts: list[list[torch.Tensor]]):
        super().__init__()
        self._parts: tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]] | None = (key_parts, value_parts)
        self._buffer: _Buffer | None = None
        self._lengths = torch.tensor([[part.shape[0] for part in row] for row in key_parts])
        self._kept_width = int(self._lengths.max())
        self._width = self._kept_width  # columns in use: kept (left-padded), then added
        self.is_initialized = True
        self.device = key_parts[0][0].device

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Never needed: a ragged layer is built from kept entries."""

    # ---- what the layer holds ----------------------------------------------------------------------------------

    @property
    def lengths(self) -> torch.Tensor:
        """Kept prompt rows per (sequence, KV head), ``[batch, kv_heads]`` (CPU)."""
        return self._lengths.clone()

    @property
    def added_rows(self) -> int:
        """Rows appended to every (sequence, head) since the layer was built."""
        return self._width - self._kept_width

    @property
    def key_parts(self) -> list[list[torch.Tensor]]:
        """Kept prompt keys, one ``[n, head_dim]`` tensor per (sequence, KV head)."""
        return self._kept(0)

    @property
    def value_parts(self) -> list[list[torch.Tensor]]:
        """Kept prompt values, one ``[n, head_dim]`` tensor per (sequence, KV head)."""
        return self._kept(1)

    def _kept(self, which: int) -> list[list[torch.Tensor]]:
        if self._buffer is None:
            return self._parts[which]
        rows = (self._buffer.keys, self._buffer.values)[which]
        return [[rows[b, h, self._kept_width - int(n) : self._kept_width] for h, n in enumerate(row)]
                for b, row in enumerate(self._lengths.tolist())]

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[batch, kv_heads, T, head_dim]``: kept rows left-padded (zeros), then the rows added
        since. Views of the buffer once a row was appended (never written afterwards); new tensors before."""
        if self._buffer is None:
            return _left_padded(self._parts[0], self._kept_width), _left_padded(self._parts[1], self._kept_width)
        return self._buffer.keys[:, :, : self._width], self._buffer.values[:, :, : self._width]

    def valid_rows(self) -> torch.Tensor:
        """``[batch, kv_heads, T]`` (a new tensor): which rows of :meth:`padded` are real (not left padding)."""
        device = self._held()[0].device
        first_kept = (self._kept_width - self._lengths).to(device)
        return torch.arange(self._width, device=device) >= first_kept[..., None]

    def get_seq_length(self) -> int:
        return self._width

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes of the entries held: every kept row and every added row (not left padding, not spare capacity)."""
        keys, values = self._held()
        row_bytes = keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size()
        batch, heads = self._lengths.shape
        return row_bytes * (int(self._lengths.sum()) + batch * heads * self.added_rows)

    def allocated_nbytes(self) -> int:
        """Bytes of every tensor the layer holds: :meth:`nbytes` plus the buffer's left padding and spare columns."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _held(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One key and one value tensor of the layer (for dtype, width and device)."""
        if self._buffer is None:
            return self._parts[0][0][0], self._parts[1][0][0]
        return self._buffer.keys, self._buffer.values

    def _tensors(self) -> list[torch.Tensor]:
        if self._buffer is None:
            return [part for parts in self._parts for row in parts for part in row]
        return [self._buffer.keys, self._buffer.values]

    # ---- appending ------------------------------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append rows to every (sequence, head), in place; the layer's keys and values as views (:meth:`padded`)."""
        rows = key_states.shape[-2]
        buffer = self._writable(rows)
        buffer.keys[:, :, self._width : self._width + rows] = key_states
        buffer.values[:, :, self._width : self._width + rows] = value_states
        self._width += rows
        buffer.filled = self._width
        return self.padded()

    def _writable(self, rows: int) -> _Buffer:
        """A buffer this layer may write ``rows`` columns into at ``_width``: its own, or a new, larger one."""
        buffer = self._buffer
        if buffer is not None and buffer.filled == self._width and buffer.capacity >= self._width + rows:
            return buffer
        keys, values = self.padded()
        needed = self._width + rows
        self._buffer = _Buffer(_grown(keys, needed), _grown(values, needed), filled=self._width)
        self._parts = None
        return self._buffer

    def crop(self, tokens_to_remove: int) -> None:
        """Only ``crop(0)`` (nothing removed): a layer whose heads hold different rows is not rolled back."""
        if tokens_to_remove != 0:
            raise UnsupportedInputError(
                f"crop({tokens_to_remove}) on a head-adaptive (ragged) cache layer: its rows cannot be rolled back, so "
                "assisted or speculative decoding is not supported on it; only crop(0) is valid. Decode without an "
                "assistant model, or compress with uniform budgets"
            )

    # ---- transformers' contract: beams, offloading, reset ---------------------------------------------------------

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence ``i`` becomes what sequence ``beam_idx[i]`` was."""
        self._take_sequences(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each sequence ``repeats`` times in a row (beam search or several returned sequences per prompt)."""
        self._take_sequences(torch.arange(self._lengths.shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the sequences ``indices``, in that order."""
        self._take_sequences(torch.as_tensor(indices).reshape(-1))

    def _take_sequences(self, index: torch.Tensor) -> None:
        index = index.cpu().long()
        self._lengths = self._lengths[index]
        if self._buffer is None:
            keys, values = self._parts
            self._parts = ([keys[i] for i in index.tolist()], [values[i] for i in index.tolist()])
        else:
            device_index = index.to(self._buffer.keys.device)
            keys, values = (rows.index_select(0, device_index) for rows in self.padded())
            self._buffer = _Buffer(_grown(keys, self._width), _grown(values, self._width), filled=self._width)

    def offload(self) -> None:
        """Move the layer's tensors to the CPU (the cache's ``offload``)."""
        self._move("cpu")

    def prefetch(self) -> None:
        """Move the layer's tensors back to its device after :meth:`offload`."""
        self._move(self.device)

    def _move(self, device) -> None:
        if self._buffer is None:
            keys, values = self._parts
            self._parts = tuple([[part.to(device, non_blocking=True) for part in row] for row in parts]
                                for parts in (keys, values))
        elif self._buffer.keys.device != torch.device(device):
            self._buffer = _Buffer(self._buffer.keys.to(device, non_blocking=True),
                                   self._buffer.values.to(device, non_blocking=True), filled=self._width)

    def reset(self) -> None:
        """Drop every row: an empty layer (every head length 0) that later appends grow like a dense one."""
        keys, values = self._held()
        batch, heads = self._lengths.shape
        self._parts = tuple([[t.new_empty(0, t.shape[-1]) for _ in range(heads)] for _ in range(batch)]
                            for t in (keys, values))
        self._buffer = None
        self._lengths = torch.zeros(batch, heads, dtype=torch.long)
        self._kept_width = self._width = 0


def _left_padded(parts: list[list[torch.Tensor]], width: int) -> torch.Tensor:
    """``[batch, heads, width, dim]``: each (sequence, head)'s rows right-aligned, zeros before them."""
    first = parts[0][0]
    out = first.new_zeros(len(parts), len(parts[0]), width, first.shape[-1])
    for b, row in enumerate(parts):
        for h, part in enumerate(row):
            out[b, h, width - part.shape[0] :] = part
    return out


def _grown(rows: torch.Tensor, needed: int) -> torch.Tensor:
    """A new ``[batch, heads, capacity, dim]`` tensor holding ``rows`` first, with room for ``needed`` columns and
    spare ones (a quarter of ``needed``, at least :data:`MIN_SPARE`); the spare columns are left unwritten."""
    capacity = needed + max(needed // SPARE_SHARE, MIN_SPARE)
    out = rows.new_empty(*rows.shape[:2], capacity, rows.shape[-1])
    out[:, :, : rows.shape[-2]] = rows
    return out
