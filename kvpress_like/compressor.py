"""Compression of one layer at a time: a forward hook that scores, selects and prunes.

One mechanism only: a ``register_forward_hook(with_kwargs=True)`` on each attention module. After the
module has written this forward's keys and values to the cache it was called with, the hook keeps the
attention inputs of any window rows this forward holds; once every window row and the whole prompt
have been seen, it takes the window's post-RoPE queries (from the model's attention call when a query
tap holds them, else projected again from the kept inputs), scores the prompt keys, selects the kept
set and writes the kept rows either back into that same cache (a one-pass prefill: the layer's full
keys and values, and any appended rows, are released at once) or into a separate *target* cache
(several pipelines sharing one prompt forward). Hooks are removed when the forward returns or raises.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from kvpress_like.adapters import apply_rope, window_queries
from kvpress_like.cache import CompressedCache
from kvpress_like.compat import cache_from_hook_kwargs
from kvpress_like.layer_step import keep_all, score_layer, select_counts, select_rows
from kvpress_like.parts import Allocator, LayerContext, Scorer, Selector, WindowPlan
from kvpress_like.plugins import get_plugin_manager
from kvpress_like.query_tap import QueryTap
from kvpress_like.ragged import RaggedLayer
from kvpress_like.report import CompressionReport, LayerReport

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # attention input, cos, sin of some rows


@dataclass
class LayerCompressor:
    """Scores and prunes every layer listed in ``budgets`` as the prompt (and its window) go through.

    ``target`` is the cache that receives the kept rows; ``None`` prunes the cache the model was
    called with, in place. ``scores_memo`` (shared between compressors whose window and scorer are
    identical) lets several budgets reuse one scoring. ``query_tap``: where the model's attention left the
    window's queries (a one-pass prefill, :mod:`kvpress_like.query_tap`); without it they are projected again.
    """

    plan: WindowPlan
    target: CompressedCache | None
    scorer: Scorer
    selector: Selector
    allocator: Allocator
    budgets: dict[int, int]
    report: CompressionReport
    pipeline: object
    rope_at: Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    keep_hidden_states: bool = False
    scores_memo: dict | None = None
    sequence: int = 0  # this compressor's row in a left-padded batch (see PaddedBatchCompressor)
    query_tap: QueryTap | None = None
    captured: dict[int, list[Inputs]] = field(default_factory=dict)
    prompt_inputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    full_layer_bytes: dict[int, int] = field(default_factory=dict)  # bytes each layer held uncompressed
    deferred: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)  # model-wide

    @contextmanager
    def attached(self, modules: list[torch.nn.Module]):
        handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @property
    def seconds_spent(self) -> float:
        """Compression time so far: reported layers and layers waiting for a model-wide allocation."""
        return sum(layer.seconds for layer in self.report.layers.values()) + sum(d[2] for d in self.deferred.values())

    @functools.cached_property
    def rows_needed(self) -> int:
        """Rows (prompt + appended) that must have gone through before this layer can be compressed."""
        last_window_row = int(self.plan.window_rows.max()) + 1 if self.plan.window_rows.numel() else 0
        return max(self.plan.prompt_length, last_window_row)

    def _hook(self, module, args, kwargs, output) -> None:
        layer_idx = module.layer_idx
        if layer_idx not in self.budgets:
            return
        source = cache_from_hook_kwargs(kwargs)
        start = source.layers[layer_idx].keys.shape[-2] - kwargs["hidden_states"].shape[1]  # this forward's first row
        started = time.perf_counter()
        try:
            kept = self._step(module, layer_idx, source, kwargs, start)
        except Exception as error:
            error.add_note(f"kvpress_like: {self.pipeline.name!r} failed on layer {layer_idx}; no cache was returned")
            raise
        if kept is None:  # an early forward (compressed by a later one), or scored for a model-wide allocation
            if layer_idx in self.deferred:
                scores, protected, _ = self.deferred[layer_idx]
                self.deferred[layer_idx] = (scores, protected, time.perf_counter() - started)
            return
        self._report_layer(layer_idx, kept, time.perf_counter() - started)

    def _report_layer(self, layer_idx: int, kept, seconds: float) -> None:
        layer_report = LayerReport(layer_idx, kept, self.budgets[layer_idx], seconds)
        self.report.layers[layer_idx] = layer_report
        get_plugin_manager().hook.layer_compressed(layer_report=layer_report, pipeline=self.pipeline)

    def _step(self, module, layer_idx: int, source: CompressedCache, kwargs, start: int):
        """This forward's share of a layer's compression: kept indices once the layer is written, else ``None``."""
        layer = source.layers[layer_idx]
        selection = self._select_when_complete(module, layer_idx, layer.keys, layer.values, kwargs, start)
        if selection is None:
            if layer_idx in self.deferred and self.target is None:  # in place: nobody else reads this layer
                self._hold_prompt_rows(source, layer_idx)
            return None
        kept, keys, values = selection
        self._store(source, layer_idx, keys, values)
        return kept

    def _hold_prompt_rows(self, source: CompressedCache, layer_idx: int) -> None:
        """A layer waiting for the model-wide allocation keeps its prompt rows; its appended rows go now."""
        layer, length = source.layers[layer_idx], self.plan.prompt_length
        if layer.keys.shape[-2] > length:
            keys, values = layer.keys[:, :, :length].clone(), layer.values[:, :, :length].clone()
            source.replace_layer(layer_idx, keys, values, seen=length)

    def finish(self, source: CompressedCache) -> None:
        """Prune the layers a model-wide allocator waited for, now that every layer is scored (after the forward).

        ``source`` holds their prompt rows; the kept rows go to the target (or back into ``source``).
        """
        if not self.deferred:
            return
        started = time.perf_counter()
        layers = sorted(self.deferred)
        counts = self.allocator.model_head_budgets(
            {i: self.deferred[i][0] for i in layers}, {i: self.budgets[i] for i in layers},
            {i: self.deferred[i][1] for i in layers},
        )
        ranking = (time.perf_counter() - started) / len(layers)
        length = self.plan.prompt_length
        for layer_idx in layers:
            started = time.perf_counter()
            scores, _, scoring = self.deferred.pop(layer_idx)
            layer = source.layers[layer_idx]
            keys, values, budget = layer.keys[:, :, :length], layer.values[:, :, :length], self.budgets[layer_idx]
            try:
                chosen = select_counts(scores, counts[layer_idx], budget, keys, values, self.selector)
                kept, keys, values = chosen.kept, chosen.keys, chosen.values
            except Exception as error:
                error.add_note(f"kvpress_like: {self.pipeline.name!r} failed on layer {layer_idx} (model-wide "
                               "selection); no cache was returned")
                raise
            self._store(source, layer_idx, keys, values)
            self._report_layer(layer_idx, kept, scoring + ranking + time.perf_counter() - started)

    def _store(self, source: CompressedCache, layer_idx: int, keys, values) -> None:
        """Write a layer's kept rows (dense tensors, or per (sequence, head) lists) to the target, noting the
        bytes its full prompt rows took in ``source``."""
        length, full = self.plan.prompt_length, source.layers[layer_idx].keys
        self.full_layer_bytes[layer_idx] = 2 * full[:, :, :length].numel() * full.element_size()
        target = self.target if self.target is not None else source
        if isinstance(keys, torch.Tensor):
            target.replace_layer(layer_idx, keys, values, seen=length)
        else:
            target.replace_with_ragged(layer_idx, RaggedLayer(keys, values), seen=length)

    def _select_when_complete(self, module, layer_idx: int, all_keys, all_values, kwargs, start: int):
        """:meth:`select` once every row it needs has gone through; before that, keep this forward's window rows
        (``None``)."""
        if start + kwargs["hidden_states"].shape[1] < self.rows_needed:
            self._capture(layer_idx, kwargs, start)
            return None
        selection = self.select(module, layer_idx, all_keys, all_values, kwargs, start)
        self.captured.pop(layer_idx, None)
        self.prompt_inputs.pop(layer_idx, None)
        return selection

    def _capture(self, layer_idx: int, kwargs, start: int) -> None:
        hidden = kwargs["hidden_states"]
        local = self._local_rows(hidden.shape[1], start, hidden.device)
        if _count(local, hidden.shape[1]):  # copies: a view would keep this forward's whole input alive
            cos, sin = kwargs["position_embeddings"]
            rows = (hidden[:, local], cos[:, local], sin[:, local])
            self.captured.setdefault(layer_idx, []).append(tuple(t.clone() for t in rows) if isinstance(
                local, slice) else rows)
        if self.keep_hidden_states:
            self.prompt_inputs.setdefault(layer_idx, []).append(hidden[:, : self.plan.prompt_length - start])

    def _local_rows(self, forward_rows: int, start: int, device) -> slice | torch.Tensor:
        """This forward's window rows in its own coordinates: a slice when the window is one run of rows (suffix
        and appended windows: views, no copies, a handful of operations less per layer), else an index."""
        run = self.plan.row_run
        if run is not None:
            lo, hi = max(run[0], start), min(run[1], start + forward_rows)
            return slice(lo - start, max(lo, hi) - start)
        rows = self.plan.window_rows.to(device)
        return rows[(rows >= start) & (rows < start + forward_rows)] - start

    def _window_inputs(self, layer_idx: int, kwargs, start: int) -> Inputs:
        """Attention inputs and ``(cos, sin)`` of every window row: those captured earlier, then this forward's."""
        hidden = kwargs["hidden_states"]
        local = self._local_rows(hidden.shape[1], start, hidden.device)
        cos, sin = kwargs["position_embeddings"]
        current = (hidden[:, local], cos[:, local], sin[:, local])
        if layer_idx not in self.captured:
            return current
        parts = [*self.captured[layer_idx], current]
        return tuple(torch.cat(pieces, dim=1) for pieces in zip(*parts, strict=True))

    def _window_queries(self, module, layer_idx: int, kwargs, start: int) -> torch.Tensor:
        """Post-RoPE queries of the window: those the model's attention computed, when tapped; else the window's
        attention inputs projected and rotated again."""
        tapped = None if self.query_tap is None else self.query_tap.pop(layer_idx)
        if tapped is None:
            tapped = window_queries(module, *self._window_inputs(layer_idx, kwargs, start))
        return self._shifted(module, tapped)

    def _shifted(self, module, queries: torch.Tensor) -> torch.Tensor:
        """``queries`` moved ``plan.query_shift`` positions later (a rotation by that many positions' angles)."""
        shift = self.plan.query_shift
        if not shift:
            return queries
        offsets = torch.full((queries.shape[2],), shift, device=queries.device)
        cos, sin = self.rope_at(module, offsets)
        return apply_rope(queries, cos.to(queries.dtype), sin.to(queries.dtype))

    @property
    def scored_layers(self) -> list[int]:
        """Layers that :meth:`select` scores: those whose budget is below the prompt's length (the others keep
        every row)."""
        return [i for i, budget in self.budgets.items() if self._scores_layer(budget)]

    def _scores_layer(self, budget: int) -> bool:
        """Whether a layer with ``budget`` is scored: it drops prompt rows, or a selector that decides the counts
        (``threshold``) may drop some."""
        return _evicts(budget, self.plan.prompt_length) or self.selector.decides_counts

    def _prompt_hidden_states(self, layer_idx: int, kwargs, start: int) -> torch.Tensor | None:
        """Attention inputs of the prompt rows ``[0, L)``; ``None`` after a chunk the scorer did not ask to keep."""
        if start > 0 and layer_idx not in self.prompt_inputs:
            return None
        current = kwargs["hidden_states"][:, : max(0, self.plan.prompt_length - start)]
        pieces = [*self.prompt_inputs.get(layer_idx, []), current]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)  # one piece: a view, not a copy

    def _prompt_context(self, layer_idx: int, kwargs, start: int) -> dict:
        """What the scorer's context says about the prompt beyond its keys: here, its hidden states."""
        return {"hidden_states": self._prompt_hidden_states(layer_idx, kwargs, start)}

    def select(self, module, layer_idx: int, all_keys, all_values, kwargs, start: int):
        """Kept indices and the kept keys and values of one layer, from its rows ``all_keys``/``all_values``
        ``[batch, kv_heads, T, head_dim]`` (prompt, then any appended rows). Dense tensors when every
        (sequence, head) keeps the same count; otherwise per (sequence, head) lists. ``None`` under a model-wide
        allocator: the scores wait for :meth:`finish`."""
        length, budget = self.plan.prompt_length, self.budgets[layer_idx]
        keys, values = all_keys[:, :, :length], all_values[:, :, :length]
        if not self._scores_layer(budget):  # every prompt row stays, in order
            chosen = keep_all(keys, values, length)
            return chosen.kept, chosen.keys, chosen.values
        scores = self._scores(module, layer_idx, all_keys, all_values, kwargs, start)
        if self.allocator.model_wide:  # selected by finish(), once every layer is scored
            protected = self.selector.checked_protected_mask(length, budget, keys.device)
            self.deferred[layer_idx] = (scores, protected, 0.0)
            return None
        chosen = select_rows(scores, budget, keys, values, self.allocator, self.selector)
        return chosen.kept, chosen.keys, chosen.values

    def _scores(self, module, layer_idx: int, keys, values, kwargs, start: int) -> torch.Tensor:
        if self.scores_memo is not None and layer_idx in self.scores_memo:
            return self.scores_memo[layer_idx].clone()  # a selector may work in place
        ctx = LayerContext(
            layer_idx=layer_idx,
            module=module,
            queries=self._window_queries(module, layer_idx, kwargs, start),
            keys=keys,
            values=values,
            query_rows=self.plan.scored_rows,
            prompt_length=self.plan.prompt_length,
            scaling=module.scaling,
            rope_at=lambda positions: self.rope_at(module, positions),
            sequence=self.sequence,
            **self._prompt_context(layer_idx, kwargs, start),
        )
        scores = score_layer(self.scorer, ctx)
        if self.scores_memo is not None:
            self.scores_memo[layer_idx] = scores.clone()
        return scores


@dataclass
class PaddedBatchCompressor(LayerCompressor):
    """A left-padded batch, each sequence compressed exactly as if it ran alone.

    Left padding shifts a sequence's rows by its pad count, prompt and appended rows alike, so sequence
    ``b`` sees the layer's rows from ``pads[b]`` on in its own coordinates: its own window (``sequences[b]``,
    planned on its unpadded ids), its own budget (a ratio resolves against its own length), its own
    protected tokens. Each sequence is selected in the forward that completes its window (one forward in
    a one-pass prefill; the appended rows' forward in :func:`~kvpress_like.prefill_many`); once every
    sequence is selected the layer is written, stored ragged (kept counts differ between sequences: exact
    bytes); kept indices are reported per sequence in the sequence's own positions.
    """

    sequences: list[LayerCompressor] = field(default_factory=list)
    pads: list[int] = field(default_factory=list)
    selected: dict[int, dict[int, tuple]] = field(default_factory=dict)  # layer -> sequence -> selection

    def _step(self, module, layer_idx: int, source: CompressedCache, kwargs, start: int):
        layer = source.layers[layer_idx]
        done = self.selected.setdefault(layer_idx, {})
        cos, sin = kwargs["position_embeddings"]
        for b, (job, pad) in enumerate(zip(self.sequences, self.pads, strict=True)):
            if b in done:
                continue
            skip = max(0, pad - start)  # rows of this forward that are this sequence's left padding
            view = {**kwargs, "hidden_states": kwargs["hidden_states"][b : b + 1, skip:],
                    "position_embeddings": (cos[b : b + 1, skip:], sin[b : b + 1, skip:])}
            try:
                selection = job._select_when_complete(
                    module, layer_idx, layer.keys[b : b + 1, :, pad:], layer.values[b : b + 1, :, pad:], view,
                    max(0, start - pad),
                )
            except Exception as error:
                error.add_note(f"kvpress_like: in sequence {b} of the batch ({job.plan.prompt_length} tokens)")
                raise
            if selection is not None:
                done[b] = selection
        if len(done) < len(self.sequences):
            return None
        del self.selected[layer_idx]
        kept, keys, values = zip(*(done[b] for b in range(len(self.sequences))), strict=True)
        self._store(source, layer_idx, [list(k[0]) for k in keys], [list(v[0]) for v in values])
        return [list(k[0]) for k in kept]


def _evicts(budget: int, prompt_length: int) -> bool:
    """Whether a layer with ``budget`` drops prompt rows (and so is scored)."""
    return budget < prompt_length


def _count(local: slice | torch.Tensor, rows: int) -> int:
    """How many rows ``local`` (a slice or an index, see ``LayerCompressor._local_rows``) picks out of ``rows``."""
    return len(range(*local.indices(rows))) if isinstance(local, slice) else local.numel()
