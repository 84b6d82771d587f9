"""The window's post-RoPE queries, read from the model's own attention call instead of projected again.

A one-pass prefill (:func:`~kvpress_like.prefill.compressed_prefill`) puts the prompt and the window's
appended rows through the model in one forward, so every window row's query is computed by the model's
attention anyway. While it runs, the model uses the ``kvpress_like`` attention (:mod:`kvpress_like.attention`),
which hands each compressed layer's queries to a :class:`QueryTap`; the tap keeps a copy of the window's rows
and the compressor's hook, which runs right after that attention call, scores with them. Without the tap the hook
projects and rotates the window's attention inputs again through the architecture adapter
(:func:`~kvpress_like.adapters.window_queries`): the same computation, equal up to rounding (a matrix product
over fewer rows may use another kernel), at the price of one query projection and one rotation per layer.

Models whose attention the ``kvpress_like`` attention cannot wrap (``flash_attention_2``) and prefills whose
window spans several forwards (:mod:`kvpress_like.progressive`, :func:`~kvpress_like.prefill.prefill_many`) run
without a tap.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from kvpress_like.attention import QUERY_TAP, can_wrap, compressed_attention


@dataclass
class QueryTap:
    """Keeps the queries ``[batch, q_heads, window, head_dim]`` of the rows ``rows`` (this forward's own
    coordinates) of every layer it is attached to, until :meth:`pop`."""

    rows: slice | torch.Tensor
    taken: dict[int, torch.Tensor] = field(default_factory=dict)

    def __call__(self, module: torch.nn.Module, query: torch.Tensor) -> None:
        rows = self.rows if isinstance(self.rows, slice) else self.rows.to(query.device)  # layers may sit on any device
        self.taken[module.layer_idx] = query[:, :, rows].clone()  # a copy: a view would keep the whole query alive

    def pop(self, layer_idx: int) -> torch.Tensor | None:
        """The window's queries of ``layer_idx`` (``None`` if its attention did not run through the tap)."""
        return self.taken.pop(layer_idx, None)


@contextmanager
def tapped_queries(model, modules: list[torch.nn.Module], rows: slice | torch.Tensor) -> Iterator[QueryTap | None]:
    """Tap the queries of ``rows`` in ``modules``' attention calls until exit (``None``: the model's attention
    cannot be wrapped, nothing is tapped). The model's attention implementation and the modules are restored
    on exit, also on error."""
    if not can_wrap(model) or not modules:
        yield None
        return
    tap = QueryTap(rows)
    with compressed_attention(model):
        try:
            for module in modules:
                setattr(module, QUERY_TAP, tap)
            yield tap
        finally:
            for module in modules:
                if hasattr(module, QUERY_TAP):
                    delattr(module, QUERY_TAP)
