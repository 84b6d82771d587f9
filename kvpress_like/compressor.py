"""Compression of one prefill: forward hooks on the attention layers that score, select and prune.

One mechanism only: a ``register_forward_hook(with_kwargs=True)`` on each attention module. After the
module has written its keys and values to the cache, the hook recomputes the window's post-RoPE
queries, scores the prompt keys, selects the kept set and replaces the layer's cache entries with it.
Hooks are removed when the forward returns or raises.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kvpress_like.adapters import window_queries
from kvpress_like.cache import CompressedCache
from kvpress_like.compat import cache_from_hook_kwargs
from kvpress_like.parts import LayerContext, Scorer, Selector, WindowPlan
from kvpress_like.plugins import get_plugin_manager
from kvpress_like.report import CompressionReport, LayerReport


@dataclass
class LayerCompressor:
    """Scores and prunes the cache of every layer listed in ``budgets`` during one forward."""

    plan: WindowPlan
    cache: CompressedCache
    scorer: Scorer
    selector: Selector
    budgets: dict[int, int]
    report: CompressionReport
    pipeline: object
    row_offset: int = 0
    active: bool = False

    @contextmanager
    def attached(self, modules: list[torch.nn.Module]):
        handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, module, args, kwargs, output) -> None:
        layer_idx = module.layer_idx
        if not self.active or layer_idx not in self.budgets:
            return
        if cache_from_hook_kwargs(kwargs) is not self.cache:
            raise RuntimeError("the attention layer was called with a cache other than the pipeline's")
        started = time.perf_counter()
        kept = self._compress(module, layer_idx, kwargs)
        layer_report = LayerReport(layer_idx, kept, self.budgets[layer_idx], time.perf_counter() - started)
        self.report.layers[layer_idx] = layer_report
        get_plugin_manager().hook.layer_compressed(layer_report=layer_report, pipeline=self.pipeline)

    def _compress(self, module, layer_idx: int, kwargs) -> torch.Tensor:
        length = self.plan.prompt_length
        local_rows = (self.plan.window_rows - self.row_offset).to(kwargs["hidden_states"].device)
        cos, sin = kwargs["position_embeddings"]
        queries = window_queries(
            module, kwargs["hidden_states"][:, local_rows], cos[:, local_rows], sin[:, local_rows]
        )
        layer = self.cache.layers[layer_idx]
        ctx = LayerContext(
            layer_idx=layer_idx,
            module=module,
            queries=queries,
            keys=layer.keys,
            values=layer.values,
            query_rows=self.plan.window_rows,
            prompt_length=length,
            scaling=module.scaling,
        )
        scores = self.scorer.score(ctx)
        kept = self.selector.select(scores, self.budgets[layer_idx])
        _check_kept(kept, scores.shape, self.budgets[layer_idx], type(self.selector).__name__)
        index = kept.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
        keys = layer.keys[:, :, :length].gather(2, index)
        values = layer.values[:, :, :length].gather(2, index)
        self.cache.replace_layer(layer_idx, keys, values, seen=length)
        return kept


def _check_kept(kept: torch.Tensor, score_shape: torch.Size, budget: int, selector: str) -> None:
    batch, heads, length = score_shape
    if kept.shape != (batch, heads, budget):
        raise RuntimeError(f"{selector} returned kept indices of shape {tuple(kept.shape)}, "
                           f"expected {(batch, heads, budget)}")
    if budget and (kept.min() < 0 or kept.max() >= length):
        raise RuntimeError(f"{selector} returned indices outside [0, {length})")
