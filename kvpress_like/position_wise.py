"""The decoder layers' MLPs, run lean during a compressed prefill: they hold a forward's largest activations.

A forward over ``L`` rows holds several ``L × intermediate_size`` buffers in each MLP: in a gated MLP
(``down(act(gate(x)) * up(x))``: Llama, Mistral, Qwen, Gemma) the activation, ``up(x)`` and their product
at once. :class:`LeanMLP` writes the product into the activation's buffer instead, so only two exist at a
time; the output is bit-identical (the same multiplication, written in place). MLPs of another form (e.g.
Phi-3's fused ``gate_up_proj``) run unchanged. With ``rows`` the MLP also runs on that many rows at a time:
each row's output depends on that row only, so the result is the same up to rounding (a matrix product
over fewer rows may pick another kernel).

Both only apply inside :func:`lean_mlps`, which puts the model's own modules back on exit (also on error).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

GATED_PARTS = frozenset({"gate_proj", "up_proj", "down_proj", "act_fn"})


def is_gated(mlp: torch.nn.Module) -> bool:
    """Whether ``mlp`` is a gated MLP of the Llama form: exactly the children ``gate_proj``, ``up_proj``,
    ``down_proj`` (linear layers) and ``act_fn``."""
    children = dict(mlp.named_children())
    return set(children) == GATED_PARTS and all(
        isinstance(children[name], torch.nn.Linear) for name in ("gate_proj", "up_proj", "down_proj")
    )


class LeanMLP(torch.nn.Module):
    """``inner`` (a position-wise MLP) with the gated product written in place and, with ``rows``, run on at
    most ``rows`` rows at a time. The product is written in place only without gradients and when neither the
    MLP nor its activation has hooks; otherwise the MLP runs as it is."""

    def __init__(self, inner: torch.nn.Module, rows: int | None = None):
        super().__init__()
        self.inner, self.rows = inner, rows
        self.gated = is_gated(inner)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.rows is None or hidden.shape[1] <= self.rows:
            return self._run(hidden)
        out = None
        for start in range(0, hidden.shape[1], self.rows):
            part = self._run(hidden[:, start : start + self.rows])
            out = part.new_empty(*hidden.shape[:2], part.shape[-1]) if out is None else out
            out[:, start : start + part.shape[1]] = part
        return out

    def _run(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.gated or torch.is_grad_enabled() or _hooked(self.inner) or _hooked(self.inner.act_fn):
            return self.inner(hidden)  # as the model would: gradients, or hooks that expect its own calls
        mlp = self.inner
        product = mlp.act_fn(mlp.gate_proj(hidden))
        product.mul_(mlp.up_proj(hidden))
        return mlp.down_proj(product)


def _hooked(module: torch.nn.Module) -> bool:
    """Whether ``module`` has forward hooks of its own (they expect the module to be called, and an
    ``act_fn`` hook may keep the buffer that the lean product overwrites)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


@contextmanager
def lean_mlps(decoder_layers, rows: int | None = None):
    """Every decoder layer's MLP runs as a :class:`LeanMLP` (``rows`` at a time, if given) until exit."""
    layers = [layer for layer in decoder_layers if isinstance(getattr(layer, "mlp", None), torch.nn.Module)]
    originals = [layer.mlp for layer in layers]
    try:
        for layer, mlp in zip(layers, originals, strict=True):
            layer.mlp = LeanMLP(mlp, rows)
        yield
    finally:
        for layer, mlp in zip(layers, originals, strict=True):
            layer.mlp = mlp
