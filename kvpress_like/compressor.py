"""Compression of one layer at a time: a forward hook that scores, selects and prunes.

One mechanism only: a ``register_forward_hook(with_kwargs=True)`` on each attention module. After the
module has written its keys and values to the cache it was called with (the *source*), the hook
recomputes the window's post-RoPE queries, scores the prompt keys, selects the kept set and writes the
kept rows into the *target* cache (the source itself, or another cache when several methods share one
prompt forward). Hooks are removed when the forward returns or raises.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from kvpress_like.adapters import window_queries
from kvpress_like.cache import CompressedCache
from kvpress_like.compat import cache_from_hook_kwargs
from kvpress_like.parts import Allocator, LayerContext, Scorer, Selector, WindowPlan
from kvpress_like.plugins import get_plugin_manager
from kvpress_like.ragged import RaggedLayer
from kvpress_like.report import CompressionReport, LayerReport


@dataclass
class LayerCompressor:
    """Scores and prunes every layer listed in ``budgets`` while ``source`` is being filled."""

    plan: WindowPlan
    source: CompressedCache
    target: CompressedCache
    scorer: Scorer
    selector: Selector
    budgets: dict[int, int]
    report: CompressionReport
    pipeline: object
    rope_at: Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    row_offset: int = 0

    @contextmanager
    def attached(self, modules: list[torch.nn.Module]):
        handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    allocator: Allocator | None = None
    captured: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def _hook(self, module, args, kwargs, output) -> None:
        layer_idx = module.layer_idx
        if layer_idx not in self.budgets:
            return
        if cache_from_hook_kwargs(kwargs) is not self.source:
            raise RuntimeError("the attention layer was called with a cache other than the pipeline's")
        started = time.perf_counter()
        kept = self._compress(module, layer_idx, kwargs)
        layer_report = LayerReport(layer_idx, kept, self.budgets[layer_idx], time.perf_counter() - started)
        self.report.layers[layer_idx] = layer_report
        get_plugin_manager().hook.layer_compressed(layer_report=layer_report, pipeline=self.pipeline)

    def _compress(self, module, layer_idx: int, kwargs) -> torch.Tensor:
        length, budget = self.plan.prompt_length, self.budgets[layer_idx]
        layer = self.source.layers[layer_idx]
        keys, values = layer.keys[:, :, :length], layer.values[:, :, :length]
        if budget >= length:  # nothing to evict: every prompt row stays, in order
            kept = torch.arange(length, device=keys.device).expand(keys.shape[0], keys.shape[1], length)
            self.target.replace_layer(layer_idx, keys, values, seen=length)
            return kept
        queries = window_queries(module, *self._window_inputs(layer_idx, kwargs))
        ctx = LayerContext(
            layer_idx=layer_idx,
            module=module,
            queries=queries,
            keys=layer.keys,
            values=layer.values,
            query_rows=self.plan.window_rows,
            prompt_length=length,
            scaling=module.scaling,
            budget=budget,
            hidden_states=kwargs["hidden_states"],
            rope_at=lambda positions: self.rope_at(module, positions),
        )
        scores = self.scorer.score(ctx)
        counts = self.allocator.head_budgets(scores, budget, self.selector.protected_mask(length, budget, keys.device))
        if bool((counts == budget).all()):
            kept = self.selector.select(scores, budget)
            _check_kept(kept, scores.shape, budget, type(self.selector).__name__)
            index = kept.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
            self.target.replace_layer(layer_idx, keys.gather(2, index), values.gather(2, index), seen=length)
            return kept
        return self._compress_ragged(layer_idx, scores, counts, keys, values)

    def _window_inputs(self, layer_idx: int, kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention inputs and ``(cos, sin)`` of the window rows: those of this forward, after any captured ones."""
        rows = self.plan.window_rows.to(kwargs["hidden_states"].device)
        local = rows[rows >= self.row_offset] - self.row_offset
        cos, sin = kwargs["position_embeddings"]
        current = (kwargs["hidden_states"][:, local], cos[:, local], sin[:, local])
        if layer_idx not in self.captured:
            return current
        captured = self.captured[layer_idx]
        return tuple(torch.cat([early, late], dim=1) for early, late in zip(captured, current, strict=True))

    @contextmanager
    def capturing(self, modules: list[torch.nn.Module]):
        """During the prompt forward, keep the attention inputs of window rows that lie inside the prompt.

        Needed by windows that mix prompt rows with appended rows (``union``): the appended forward only
        sees its own rows.
        """
        rows = self.plan.window_rows[self.plan.window_rows < self.plan.prompt_length]

        def capture(module, args, kwargs):
            if module.layer_idx in self.budgets:
                cos, sin = kwargs["position_embeddings"]
                local = rows.to(cos.device)
                self.captured[module.layer_idx] = (kwargs["hidden_states"][:, local], cos[:, local], sin[:, local])

        handles = [m.register_forward_pre_hook(capture, with_kwargs=True) for m in modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _compress_ragged(self, layer_idx, scores, counts, keys, values) -> list[list[torch.Tensor]]:
        """Per (sequence, head) selection with its own count, stored without padding."""
        kept, key_parts, value_parts = [], [], []
        for b in range(scores.shape[0]):
            kept_row, key_row, value_row = [], [], []
            for h in range(scores.shape[1]):
                count = int(counts[b, h])
                index = self.selector.select(scores[b : b + 1, h : h + 1], count)[0, 0]
                _check_kept(index[None, None], scores[b : b + 1, h : h + 1].shape, count, type(self.selector).__name__)
                kept_row.append(index)
                key_row.append(keys[b, h, index])
                value_row.append(values[b, h, index])
            kept.append(kept_row)
            key_parts.append(key_row)
            value_parts.append(value_row)
        self.target.replace_with_ragged(layer_idx, RaggedLayer(key_parts, value_parts), seen=self.plan.prompt_length)
        return kept


def _check_kept(kept: torch.Tensor, score_shape: torch.Size, budget: int, selector: str) -> None:
    batch, heads, length = score_shape
    if kept.shape != (batch, heads, budget):
        raise RuntimeError(
            f"{selector} returned kept indices of shape {tuple(kept.shape)}, expected {(batch, heads, budget)}"
        )
    if kept.numel() and (kept.min() < 0 or kept.max() >= length):
        raise RuntimeError(f"{selector} returned indices outside [0, {length})")
