"""A DynamicCache whose layers may hold fewer entries than the tokens they have seen.

After eviction a layer's *physical* length (rows held) is shorter than its *logical* length (tokens
seen). ``get_seq_length`` reports the logical length, so models and ``generate`` give new tokens the
positions L, L+1, … and never re-feed evicted tokens; ``get_query_offset`` reports the physical
length, which is what attention masks index.

Once compressed, full-attention layers may hold different numbers of rows (per-layer budgets), their
heads or sequences may (a :class:`~kvpress_like.ragged.RaggedLayer`), and a padded batch's 2-D attention
mask counts logical positions, not the rows held: no mask transformers builds can serve such a cache.
A compressed prefill therefore sets ``own_masks``, and the cache hands each full-attention layer's rows
to :mod:`kvpress_like.attention` as a :class:`~kvpress_like.attention.MaskedKV`, with the validity of
every row (rows added after the prefill that were padding are remembered as such).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from kvpress_like.attention import MaskedKV
from kvpress_like.errors import UnsupportedInputError
from kvpress_like.ragged import RaggedLayer


class CompressedCache(DynamicCache):
    """DynamicCache with per-layer eviction bookkeeping (logical = physical + evicted)."""

    def __init__(self, config):
        super().__init__(config=config)
        self.evicted: dict[int, int] = {}
        self.peak_nbytes = 0
        self.track_peak = False  # set by a prefill while it runs: bytes are noted at every update then
        self.own_masks = False  # set by a compressed prefill: layers are masked by kvpress_like.attention
        self.token_mask: torch.Tensor | None = None  # [batch, logical length]: which tokens are real (padding)
        self.added_valid: dict[int, torch.Tensor] = {}  # per layer: validity of rows added after the prefill
        self.decoding = None  # a DecodeCompressor (kvpress_like.decode_compression) keeping it within its schedule

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """DynamicCache's update; during a prefill it notes the bytes held afterwards (``peak_nbytes``).

        With ``own_masks`` it returns a full-attention layer's rows as a :class:`MaskedKV`, and the first
        layer of each forward checks that the new tokens' positions follow what the cache has seen.
        """
        position_ids = kwargs.get("kwargs", {}).get("position_ids")
        if self.own_masks and layer_idx == 0:
            self._check_new_positions(position_ids)
        watched = self.decoding is not None and layer_idx in self.decoding.layers
        if watched:
            self.decoding.note_rows(self, layer_idx, key_states.shape[-2], position_ids)
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.note_peak()
        layer = self.layers[layer_idx]
        if getattr(layer, "is_sliding", False) or not self.own_masks:
            return keys, values
        if isinstance(layer, RaggedLayer):
            valid = layer.valid_rows()
        else:
            valid = torch.ones(keys.shape[0], 1, keys.shape[-2], dtype=torch.bool, device=keys.device)
        added = self._added_valid(layer_idx, key_states.shape[0], key_states.shape[-2], keys.device)
        if added.shape[-1]:
            valid[..., -added.shape[-1] :] &= added[:, None, :]
        rows = key_states.shape[-2]
        after = (lambda query, new: self.decoding.after_attention(self, layer_idx, query, new)) if watched else None
        all_valid = self.token_mask is None and not isinstance(layer, RaggedLayer)
        return MaskedKV(keys, valid, lambda new: self._mark_added(layer_idx, new, rows), after, all_valid), values

    def note_peak(self) -> None:
        """While ``track_peak``: remember the most key/value bytes held so far."""
        if self.track_peak:
            self.peak_nbytes = max(self.peak_nbytes, self.nbytes())

    def _check_new_positions(self, position_ids: torch.Tensor | None) -> None:
        """Refuse tokens placed at positions this cache has already seen (``model.generate`` given only the ids
        that were prefilled feeds them all again: the answer would be silently wrong)."""
        if position_ids is None:
            return
        before = self.get_seq_length(0)
        seen = torch.tensor([before]) if self.token_mask is None else self.token_mask[:, :before].sum(dim=1).cpu()
        last = position_ids[:, -1].cpu()
        if bool((last < seen).any()):
            raise UnsupportedInputError(
                f"tokens fed at positions up to {last.tolist()}, which this compressed cache has already seen "
                f"({seen.tolist()} tokens): feed only what follows the prefilled ids. To continue right after the "
                "prefill, decode from its logits: kvpress_like.decoding.decode_batch(model, result.cache, "
                "result.next_token_logits, ...) or Pipeline.generate; with model.generate, prefill ids[:, :-1] "
                "and pass ids (transformers then feeds the last token)"
            )

    def _added_valid(self, layer_idx: int, batch: int, new_rows: int, device) -> torch.Tensor:
        """Validity ``[batch, n]`` of the rows added since the prefill, this forward's (assumed real) included."""
        previous = self.added_valid.get(layer_idx, torch.zeros(batch, 0, dtype=torch.bool, device=device))
        added = torch.cat([previous, torch.ones(batch, new_rows, dtype=torch.bool, device=device)], dim=-1)
        self.added_valid[layer_idx] = added
        return added

    def _mark_added(self, layer_idx: int, valid: torch.Tensor, rows: int) -> None:
        added = self.added_valid[layer_idx].clone()
        added[:, -rows:] = valid.to(added.device)
        self.added_valid[layer_idx] = added

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

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._refuse_under_decoding("beam search (reorder_cache)")
        super().reorder_cache(beam_idx)
        self._take_sequence_rows(lambda rows: rows.index_select(0, beam_idx.to(rows.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse_under_decoding("repeating the batch (num_beams or num_return_sequences > 1)")
        super().batch_repeat_interleave(repeats)
        self._take_sequence_rows(lambda rows: rows.repeat_interleave(repeats, dim=0))

    # ---- batch reordering and reset: the per-sequence bookkeeping follows the layers (kvpress_like.ragged) ----

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse_under_decoding("selecting sequences of the batch (batch_select_indices)")
        super().batch_select_indices(indices)
        self._take_sequence_rows(lambda rows: rows[torch.as_tensor(indices, device=rows.device)])

    def _take_sequence_rows(self, take) -> None:
        """Apply ``take`` (rows ``[batch, ...]`` to rows) to what the cache notes per sequence: ``token_mask`` and
        ``added_valid``."""
        if self.token_mask is not None:
            self.token_mask = take(self.token_mask)
        self.added_valid = {i: take(valid) for i, valid in self.added_valid.items()}

    def reset(self) -> None:
        """Empty every layer and forget what was evicted and padded: the cache starts again at position 0."""
        self._refuse_under_decoding("reset()")
        super().reset()
        self.evicted, self.token_mask, self.added_valid = {}, None, {}

    # ---- end of batch reordering and reset ----

    def _refuse_under_decoding(self, what: str) -> None:
        if self.decoding is not None:
            raise UnsupportedInputError(
                f"{what} is not supported with decode-time compression: each beam would need its own decode "
                "schedule. Use greedy or sampled decoding (num_beams=1), or build the pipeline without decoding"
            )

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

    def replace_layer(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, seen: int) -> None:
        """Hold ``keys``/``values`` for a layer that has seen ``seen`` tokens."""
        layer = self.layers[layer_idx]
        layer.keys, layer.values = keys, values
        layer.is_initialized, layer.device = True, keys.device
        self.evicted[layer_idx] = seen - keys.shape[-2]
        self.note_peak()

    def replace_with_ragged(self, layer_idx: int, layer: RaggedLayer, seen: int) -> None:
        """Hold a head-adaptive layer (each KV head its own length) for a layer that has seen ``seen`` tokens."""
        self.layers[layer_idx] = layer
        self.evicted[layer_idx] = seen - layer.get_seq_length()
        self.note_peak()

    def layer_nbytes(self, layer_idx: int) -> int:
        """Bytes of the key and value tensors one layer really holds."""
        layer = self.layers[layer_idx]
        if isinstance(layer, RaggedLayer):
            return layer.nbytes()
        return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)

    def token_nbytes(self, layer_idx: int) -> int:
        """Key and value bytes that one token takes in a layer (every sequence of the batch, every KV head)."""
        layer = self.layers[layer_idx]
        if isinstance(layer, RaggedLayer):
            pairs = [(k, v) for krow, vrow in zip(layer.key_parts, layer.value_parts, strict=True)
                     for k, v in zip(krow, vrow, strict=True)]
            return sum(k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size() for k, v in pairs)
        keys, values = layer.keys, layer.values
        return keys.shape[0] * keys.shape[1] * (keys.shape[-1] * keys.element_size()
                                                + values.shape[-1] * values.element_size())

    def uncompressed_nbytes(self, length: int, compressed: set[int] | dict) -> int:
        """Bytes this cache would hold had every layer in ``compressed`` kept all ``length`` tokens."""
        return sum(self.token_nbytes(i) * length if i in compressed else self.layer_nbytes(i)
                   for i in range(len(self.layers)))

    def nbytes(self) -> int:
        """Bytes of key and value tensors really held."""
        return sum(self.layer_nbytes(i) for i in range(len(self.layers)))
