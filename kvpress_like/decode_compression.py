"""Compression while generating: the decode schedule run over the pure layer step.

A :class:`DecodeCompressor` rides on a :class:`~kvpress_like.cache.CompressedCache` once a pipeline with a
decode schedule (:mod:`kvpress_like.decode_schedule`) has prefilled it. Every full-attention layer it watches
reports two things through the cache: the positions of the rows each forward appends (from the model's
``position_ids``: positions are passed along, never re-derived from cache shapes), and, from the ``kvpress_like``
attention call, the queries of those rows. When a layer holds ``target + interval`` rows it is cut back to its
target by :func:`~kvpress_like.layer_step.select_rows`, scored by the method's own scorer and selector with the
decode window's queries:

* ``recent`` / ``reaimed`` / ``none`` windows compress inside the forward, right after the layer's attention
  (the forward's own queries are the newest of the window), so ``model.generate`` compresses too;
* the faithful ``pseudo`` window (DapQ-D) needs one extra forward of pseudo tokens at t … t+N−1, which runs
  between steps: :func:`kvpress_like.decoding.decode_batch` calls :meth:`DecodeCompressor.between_steps`, and
  ``model.generate`` needs ``logits_processor=[DecodeEvents(model, cache)]``.

An event keeps every sequence's rows as if it ran alone (its own valid rows, its own queries, its own target) and
allocates uniformly over KV heads: head-adaptive allocators (Ada-KV) allocate at the prefill only, so events
leave dense layers, whose decode steps are the cheapest. Memory is freed physically: the layer's tensors are
replaced by the kept rows. Everything is computed before the layer is replaced, so an event that fails leaves the
layer as it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor
from transformers.cache_utils import DynamicLayer

from kvpress_like.adapters import ModelAdapter, apply_rope, get_adapter
from kvpress_like.allocators import UniformAllocator
from kvpress_like.attention import can_wrap, use_compressed_attention
from kvpress_like.decode_schedule import DecodingConfig
from kvpress_like.errors import ConfigError, UnsupportedInputError, UnsupportedModelError
from kvpress_like.layer_step import score_layer, select_rows
from kvpress_like.parts import LayerContext
from kvpress_like.ragged import RaggedLayer

_UNIFORM = UniformAllocator()


@dataclass
class DecodeEvent:
    """One layer cut back: tokens seen per sequence, the most rows a (sequence, head) held before, and the most a
    sequence that was cut holds after (a sequence of a batch that is not due keeps its rows)."""

    layer_idx: int
    seen: list[int]
    rows_before: int
    rows_after: int
    seconds: float


@dataclass
class DecodingReport:
    """Every decode-time event, the seconds they took (pseudo forwards included) and the peak cache bytes held
    at any moment after the prefill."""

    config: dict
    events: list[DecodeEvent] = field(default_factory=list)
    seconds: float = 0.0
    pseudo_forward_seconds: float = 0.0
    peak_cache_bytes: int = 0

    @property
    def event_steps(self) -> list[int]:
        """Tokens seen (first sequence) at each distinct event step."""
        return sorted({event.seen[0] for event in self.events})


@dataclass
class _Window:
    """Observed queries of one layer: ``queries`` ``[batch, q_heads, w, dim]``, their ``positions`` and ``valid``
    ``[batch, w]`` (rows of padding in a fed chunk are not queries of their sequence)."""

    queries: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor


class DecodeCompressor:
    """Keeps a compressed cache within its decode schedule while tokens are appended (see the module doc)."""

    def __init__(self, model, pipeline, config: DecodingConfig, prefill_report, prompt_ids: torch.Tensor, padded: bool):
        if not can_wrap(model):
            raise UnsupportedModelError(
                f"decode-time compression reads each layer's queries in the kvpress_like attention, which wraps "
                f"sdpa and eager only; the model uses {model.config._attn_implementation!r}: load it with "
                "attn_implementation='sdpa'"
            )
        if config.window == "pseudo" and padded:
            raise UnsupportedInputError(
                "the faithful pseudo decode window runs one forward for the whole batch at t … t+N−1, which a "
                "left-padded batch (sequences at different positions) cannot share: use decoding window 'reaimed' "
                "(no extra forward) or generate the sequences one at a time"
            )
        self.config, self.pipeline = config, pipeline
        self.adapter: ModelAdapter = get_adapter(model)
        self.modules = {m.layer_idx: m for m in self.adapter.attention_modules()
                        if m.layer_idx in prefill_report.layers}
        self.held = {i: _as_lists(report.kept_indices) for i, report in prefill_report.layers.items()}
        batch = prompt_ids.shape[0]
        lengths = prefill_report.sequence_lengths or [prefill_report.prompt_length] * batch
        self.seen: dict[int, list[int]] = {i: list(lengths) for i in self.modules}  # tokens seen, per sequence
        self.tails: dict[int, torch.Tensor] = {i: torch.zeros(batch, 0, dtype=torch.long) for i in self.modules}
        self._positions: tuple[object, torch.Tensor, list[int]] | None = None  # last forward's ids, on the host
        self.windows: dict[int, _Window] = {}
        self.prompt_head = prompt_ids[:, : config.prefix].cpu()
        self.recent_ids = prompt_ids[:, -self._pseudo_tail :].cpu()
        self.report = DecodingReport(config.model_dump(exclude_none=True))
        self.last_layer = max(self.modules) if self.modules else -1
        use_compressed_attention(model)

    @property
    def _pseudo_tail(self) -> int:
        return self.config.window_size - self.config.prefix

    @property
    def layers(self):
        return self.modules.keys()

    # ---- what the cache reports -------------------------------------------------------------------------------

    def note_rows(self, cache, layer_idx: int, rows: int, position_ids: torch.Tensor | None) -> None:
        """``rows`` rows are being appended to ``layer_idx`` at ``position_ids`` ``[batch, rows]`` (``None``: right
        after what the layer has seen)."""
        batch = self.tails[layer_idx].shape[0]
        if position_ids is not None and position_ids.shape[0] != batch:
            raise UnsupportedInputError(
                f"a forward of {position_ids.shape[0]} sequences reached a cache compressed for {batch}: beam search "
                "and num_return_sequences > 1 repeat the batch, which decode-time compression does not support (each "
                "beam would need its own schedule); decode with num_beams=1, or build the pipeline without decoding"
            )
        if position_ids is None:
            first = cache.get_seq_length(layer_idx)
            positions = torch.arange(first, first + rows).expand(batch, rows)
            last = positions[:, -1].tolist()
        elif self._positions is not None and self._positions[0] is position_ids:  # every layer of one forward
            _, positions, last = self._positions
        else:  # once per forward: the host copy and its last column serve every layer
            positions = position_ids[:, -rows:].cpu().expand(batch, rows)
            last = positions[:, -1].tolist()
            self._positions = (position_ids, positions, last)
        self.tails[layer_idx] = torch.cat([self.tails[layer_idx], positions], dim=1)
        self.seen[layer_idx] = [max(s, p + 1) for s, p in zip(self.seen[layer_idx], last, strict=True)]

    def note_ids(self, ids: torch.Tensor) -> None:
        """Token ids fed after the prompt: the pseudo window's content ends with the last of them."""
        self.recent_ids = torch.cat([self.recent_ids, ids.cpu()], dim=1)[:, -self._pseudo_tail :]

    def after_attention(self, cache, layer_idx: int, query: torch.Tensor, new_valid: torch.Tensor | None) -> None:
        """The layer's attention ran over its rows with ``query``: remember the queries; compress if due."""
        rows = query.shape[2]
        valid = torch.ones(query.shape[0], rows, dtype=torch.bool) if new_valid is None else new_valid.cpu()
        self._observe(layer_idx, query, self.tails[layer_idx][:, -rows:], valid)
        if layer_idx == self.last_layer:
            self.note_peak(cache)
        if not self._due(cache, layer_idx):
            return
        if self.config.window != "pseudo":
            self.compress(cache, layer_idx, self._observed_queries(cache, layer_idx))
        elif cache.physical_length(layer_idx) - rows >= self._limit(cache):
            raise UnsupportedInputError(
                "the faithful pseudo decode window compresses between steps, and no one ran its event: with "
                "model.generate pass logits_processor=[kvpress_like.DecodeEvents(model, cache)], or use decoding "
                "window 'reaimed' (no extra forward)"
            )

    def between_steps(self, model, cache, ids: torch.Tensor | None = None) -> None:
        """Run the events the pseudo window owes (one forward of pseudo tokens for every due layer)."""
        if ids is not None:
            self.recent_ids = ids[:, -self._pseudo_tail :].cpu()
        if self.config.window != "pseudo":
            return
        due = [i for i in self.modules if self._due(cache, i)]
        if not due:
            return
        started = time.perf_counter()
        queries = self._pseudo_queries(model, cache, due)
        self.report.pseudo_forward_seconds += time.perf_counter() - started
        self.report.seconds += time.perf_counter() - started
        for i in due:
            self.compress(cache, i, [queries[i][b : b + 1] for b in range(queries[i].shape[0])])

    def note_peak(self, cache) -> None:
        self.report.peak_cache_bytes = max(self.report.peak_cache_bytes, cache.nbytes())

    # ---- the schedule -----------------------------------------------------------------------------------------

    def _limit(self, cache) -> int:
        return min(self.config.target_for(s) for s in self.seen[self.last_layer]) + self.config.interval

    def _due(self, cache, layer_idx: int) -> bool:
        """Whether some sequence of ``layer_idx`` holds ``target + interval`` rows (its own target)."""
        fewest = min(self.config.target_for(s) for s in self.seen[layer_idx]) + self.config.interval
        return cache.physical_length(layer_idx) >= fewest

    def _observe(self, layer_idx: int, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        keep = self.config.window_size
        if self.config.window == "none":
            return
        window = self.windows.get(layer_idx)
        if window is not None and window.queries.shape[0] == query.shape[0]:
            query = torch.cat([window.queries, query], dim=2)
            positions = torch.cat([window.positions, positions], dim=1)
            valid = torch.cat([window.valid, valid], dim=1)
        self.windows[layer_idx] = _Window(query[:, :, -keep:].detach().clone(), positions[:, -keep:], valid[:, -keep:])

    def _observed_queries(self, cache, layer_idx: int) -> list[torch.Tensor]:
        """Each sequence's decode-window queries ``[1, q_heads, w, dim]`` for an event of ``layer_idx``."""
        module = self.modules[layer_idx]
        window = self.windows.get(layer_idx)
        batch = self.tails[layer_idx].shape[0]
        if self.config.window == "none" or window is None:
            empty = torch.zeros(1, module.config.num_attention_heads, 0, module.head_dim,
                                device=module.o_proj.weight.device)
            return [empty] * batch
        out = []
        for b in range(batch):
            rows = window.valid[b].nonzero().flatten()
            queries = window.queries[b : b + 1, :, rows.to(window.queries.device)]
            if self.config.window == "reaimed":
                queries = self._reaimed(module, queries, window.positions[b, rows])
            out.append(queries)
        return out

    def _reaimed(self, module, queries: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``queries`` (post-RoPE, at ``positions``) rotated to the next positions t … t+w−1 (RoPE composes:
        rotating by the difference moves a query from where it was to where the next readers sit)."""
        following = int(positions.max()) + 1 + torch.arange(positions.shape[0])
        shift = (following - positions).to(queries.device)
        cos, sin = self.adapter.rope_at(module, shift)
        return apply_rope(queries, cos.to(queries.dtype), sin.to(queries.dtype))

    def _pseudo_queries(self, model, cache, layers: list[int]) -> dict[int, torch.Tensor]:
        """DapQ-D: the queries ``[batch, q_heads, N, dim]`` of N pseudo tokens at t … t+N−1 in ``layers``, from one
        forward over a copy of the cache (the cache itself is untouched)."""
        from kvpress_like.prefill import forward, shallow_copy
        from kvpress_like.query_tap import tapped_queries

        ids = torch.cat([self.prompt_head, self.recent_ids], dim=1).to(model.device)
        first = cache.get_seq_length(layers[0])
        positions = torch.arange(first, first + ids.shape[1], device=model.device).expand(ids.shape[0], -1)
        twin = shallow_copy(cache)
        twin.decoding = None
        modules = [self.modules[i] for i in layers]
        with tapped_queries(model, modules, slice(0, ids.shape[1])) as tap:
            forward(model, twin, ids, positions)
        return {i: tap.pop(i) for i in layers}

    # ---- one event --------------------------------------------------------------------------------------------

    def compress(self, cache, layer_idx: int, queries: list[torch.Tensor]) -> None:
        """Cut ``layer_idx`` back to the target of each sequence that holds ``target + interval`` rows (its own
        target: a sequence of a batch is cut exactly when it would be alone), scored with ``queries`` (one
        ``[1, q_heads, w, dim]`` per sequence). The layer is replaced only once every sequence is selected."""
        started = time.perf_counter()
        keys, values, valid = layer_rows(cache, layer_idx)
        seen = self.seen[layer_idx]
        targets = [self.config.target_for(s) for s in seen]
        held = valid.sum(dim=-1).amax(dim=-1).tolist()  # per sequence: its longest head
        due = [rows >= target + self.config.interval for rows, target in zip(held, targets, strict=True)]
        if not any(due):
            return
        self.note_peak(cache)
        positions = self._held_positions(cache, layer_idx, valid)
        kept_keys, kept_values, kept_positions = [], [], []
        for b in range(keys.shape[0]):
            try:
                rows = [valid[b, h].nonzero().flatten() for h in range(keys.shape[1])]
                chosen = self._select_sequence(layer_idx, b, keys[b], values[b], rows, queries[b],
                                               targets[b] if due[b] else max(held))
            except Exception as error:
                error.add_note(f"kvpress_like: decode-time event on layer {layer_idx}, sequence {b} ({seen[b]} tokens "
                               "seen); the layer was left as it was")
                raise
            kept_keys.append([k for k, _, _ in chosen])
            kept_values.append([v for _, v, _ in chosen])
            kept_positions.append([positions[b][h][index] for h, (_, _, index) in enumerate(chosen)])
        logical = cache.get_seq_length(layer_idx)
        before = max(held)
        _store(cache, layer_idx, kept_keys, kept_values, logical)
        self.held[layer_idx] = kept_positions
        self.tails[layer_idx] = self.tails[layer_idx][:, :0]
        cache.added_valid.pop(layer_idx, None)
        seconds = time.perf_counter() - started
        self.report.seconds += seconds
        after = max(p.shape[0] for row, cut in zip(kept_positions, due, strict=True) if cut for p in row)
        self.report.events.append(DecodeEvent(layer_idx, seen, before, after, seconds))

    def _select_sequence(self, layer_idx, b, keys, values, rows, queries, target):
        """``[(keys, values, kept)]`` per KV head of one sequence: its valid ``rows`` per head, cut to ``target``."""
        counts = {int(r.numel()) for r in rows}
        if max(counts) <= target:
            return [(keys[h, r], values[h, r], torch.arange(r.numel())) for h, r in enumerate(rows)]
        if len(counts) == 1:  # every head holds as many rows: one scoring for the sequence
            index = torch.stack(rows).to(keys.device)
            head_keys = keys.gather(1, index[..., None].expand(-1, -1, keys.shape[-1]))[None]
            head_values = values.gather(1, index[..., None].expand(-1, -1, values.shape[-1]))[None]
            chosen = self._select(layer_idx, b, queries, head_keys, head_values, target)
            return [(chosen.keys[0, h], chosen.values[0, h], chosen.kept[0, h].cpu()) for h in range(keys.shape[0])]
        group = queries.shape[1] // keys.shape[0]
        out = []
        for h, r in enumerate(rows):  # heads of different lengths (after a head-adaptive prefill): one at a time
            head_keys, head_values = keys[h, r.to(keys.device)][None, None], values[h, r.to(keys.device)][None, None]
            if r.numel() <= target:
                out.append((head_keys[0, 0], head_values[0, 0], torch.arange(r.numel())))
                continue
            chosen = self._select(layer_idx, b, queries[:, h * group : (h + 1) * group], head_keys, head_values, target)
            out.append((chosen.keys[0, 0], chosen.values[0, 0], chosen.kept[0, 0].cpu()))
        return out

    def _select(self, layer_idx, b, queries, keys, values, target):
        module = self.modules[layer_idx]
        rows = keys.shape[2]
        ctx = LayerContext(
            layer_idx=layer_idx, module=module, queries=queries.to(keys.dtype), keys=keys, values=values,
            query_rows=torch.arange(rows, rows + queries.shape[2], device=keys.device), prompt_length=rows,
            scaling=module.scaling, hidden_states=None, rope_at=lambda p: self.adapter.rope_at(module, p), sequence=b,
        )
        scores = score_layer(self.pipeline.scorer, ctx)
        return select_rows(scores, target, keys, values, _UNIFORM, self.pipeline.selector)

    def positions(self, cache, layer_idx: int) -> list[list[torch.Tensor]]:
        """The logical positions ``layer_idx`` holds, per (sequence, KV head), in the order of its rows."""
        return self._held_positions(cache, layer_idx, layer_rows(cache, layer_idx)[2])

    def _held_positions(self, cache, layer_idx: int, valid: torch.Tensor) -> list[list[torch.Tensor]]:
        tail = self.tails[layer_idx]
        added = cache.added_valid.get(layer_idx)
        tail_valid = torch.ones_like(tail, dtype=torch.bool) if added is None else added[:, -tail.shape[1] :].cpu()
        out = []
        for b, row in enumerate(self.held[layer_idx]):
            new = tail[b][tail_valid[b]] if tail.shape[1] else tail[b]
            out.append([torch.cat([held.cpu(), new]) for held in row])
            counts = valid[b].sum(dim=-1).tolist()
            if [p.numel() for p in out[-1]] != counts:
                raise RuntimeError(f"kvpress_like: layer {layer_idx} holds {counts} valid rows in sequence {b} but "
                                   f"its positions say {[p.numel() for p in out[-1]]}: the cache was changed outside "
                                   "the decode schedule")
        return out


class DecodeEvents(LogitsProcessor):
    """Runs the events a pseudo decode window owes between ``model.generate``'s steps (scores unchanged)."""

    def __init__(self, model, cache):
        if getattr(cache, "decoding", None) is None:
            raise ConfigError("this cache has no decode schedule: build the pipeline with decoding={...}")
        self.model, self.cache = model, cache

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.cache.decoding.between_steps(self.model, self.cache, input_ids)
        return scores


def layer_rows(cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values ``[batch, kv_heads, T, dim]`` of a layer as attention sees them, and which rows are real
    ``[batch, kv_heads, T]`` (left padding of a head-adaptive layer, padding rows fed in a padded batch)."""
    layer = cache.layers[layer_idx]
    if isinstance(layer, RaggedLayer):
        keys, values = layer.padded()
        valid = layer.valid_rows().clone()
    else:
        keys, values = layer.keys, layer.values
        valid = torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device)
    added = cache.added_valid.get(layer_idx)
    if added is not None and added.shape[-1]:
        valid[..., -added.shape[-1] :] &= added[:, None, :].to(valid.device)
    return keys, values, valid.cpu()


def _store(cache, layer_idx: int, keys: list[list[torch.Tensor]], values: list[list[torch.Tensor]], logical: int):
    """Hold the kept rows: dense when every (sequence, head) keeps as many, else ragged; the logical length stays."""
    counts = {k.shape[0] for row in keys for k in row}
    if len(counts) > 1:
        cache.replace_with_ragged(layer_idx, RaggedLayer(keys, values), seen=logical)
        return
    dense_keys = torch.stack([torch.stack(row) for row in keys])
    dense_values = torch.stack([torch.stack(row) for row in values])
    if isinstance(cache.layers[layer_idx], RaggedLayer):
        cache.layers[layer_idx] = DynamicLayer()
    cache.replace_layer(layer_idx, dense_keys, dense_values, seen=logical)


def _as_lists(kept) -> list[list[torch.Tensor]]:
    """Kept indices ``[batch, heads, k]`` (or per (sequence, head) lists) as lists of 1-D CPU tensors."""
    if isinstance(kept, torch.Tensor):
        return [[kept[b, h].cpu() for h in range(kept.shape[1])] for b in range(kept.shape[0])]
    return [[index.cpu() for index in row] for row in kept]
