"""Read the queries (and their attention) that a forward pass computes, layer by layer, without changing it.

A forward hook (``with_kwargs=True``) on every attention module recomputes the queries of the rows of
the current forward from the module's input, through the same adapter the compressor uses
(:func:`kvpress_like.plugins.window_queries`): post-RoPE, and optionally pre-RoPE (the same projection
rotated by the identity, cos = 1 and sin = 0). With ``prefix`` set it also accumulates the causal
softmax attention mass those queries put on the first ``prefix`` cache rows. Hooks are removed on exit,
also when the forward raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvpress_like.compat import cache_from_hook_kwargs
from kvpress_like.eval.metrics import attention_mass
from kvpress_like.plugins import get_adapter, window_queries


@dataclass
class QueryCapture:
    """Capture per layer: ``queries[layer]`` (list, one ``[batch, q_heads, rows, d]`` per forward),
    ``pre_rope[layer]`` (same, without RoPE) and ``mass[layer]`` ``[batch, kv_heads, group, prefix]``.
    ``rows`` (indices within each forward's new tokens) restricts the capture to those rows.
    """

    model: torch.nn.Module
    prefix: int | None = None
    keep_queries: bool = False
    pre_rope: bool = False
    rows: torch.Tensor | None = None
    queries: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    pre: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    mass: dict[int, torch.Tensor] = field(default_factory=dict)
    enabled: bool = True

    def __enter__(self) -> QueryCapture:
        modules = get_adapter(self.model).attention_modules()
        self._handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in modules]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, module, args, kwargs, output) -> None:
        if not self.enabled:
            return
        layer = module.layer_idx
        hidden = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        if self.rows is not None:  # keep only these rows of the forward (e.g. a prompt's last tokens)
            rows = self.rows.to(hidden.device)
            hidden, cos, sin = hidden[:, rows], cos[:, rows], sin[:, rows]
        queries = window_queries(module, hidden, cos, sin)
        if self.keep_queries:
            self.queries.setdefault(layer, []).append(queries.detach())
        if self.pre_rope:
            plain = window_queries(module, hidden, torch.ones_like(cos), torch.zeros_like(sin))
            self.pre.setdefault(layer, []).append(plain.detach())
        if self.prefix is not None:
            cache = cache_from_hook_kwargs(kwargs)
            cache_layer = cache.layers[layer] if cache is not None else None
            if cache_layer is None or getattr(cache_layer, "is_sliding", False):
                return  # sliding-window layers are never compressed: nothing to measure
            keys = cache_layer.keys
            total, length = keys.shape[2], kwargs["hidden_states"].shape[1]
            local = self.rows.to(keys.device) if self.rows is not None else torch.arange(length, device=keys.device)
            query_rows = total - length + local
            mass = attention_mass(queries, keys, query_rows, module.scaling, self.prefix)
            self.mass[layer] = self.mass[layer] + mass if layer in self.mass else mass

    def stacked(self, layer: int, pre_rope: bool = False) -> torch.Tensor:
        """All captured rows of ``layer`` in order, ``[batch, q_heads, rows, d]``."""
        return torch.cat((self.pre if pre_rope else self.queries)[layer], dim=2)
