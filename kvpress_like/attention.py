"""The attention that reads compressed caches whose layers need masks of their own.

A compressed cache may hold a different number of rows per layer (per-layer budgets), per KV head
(head-adaptive budgets) or per sequence (a padded batch, where each sequence keeps its own budget).
transformers builds one attention mask per forward for all layers of a kind, so such a cache returns,
for each full-attention layer, a :class:`MaskedKV`: the layer's keys and values laid out densely
(shorter rows padded on the left) with the validity of every row. The attention registered here as
``"kvpress_like"`` builds that layer's own mask — valid rows, causal order among the new rows — and calls
the model's original attention (``sdpa`` or ``eager``) with it; every other layer and every ordinary
cache goes to the original attention unchanged, with the mask transformers built for it.

A prefill whose cache needs this switches the model to ``"kvpress_like"`` (so ``model.generate`` works
with the cache as it is) and remembers the original implementation; :func:`restore_attention` switches
back. ``flash_attention_2`` is refused until its variable-length path is written and tested on a GPU.

An attention module may also carry a *query tap* (attribute :data:`QUERY_TAP`, a callable
``tap(module, query)``): this attention hands it the layer's post-RoPE queries before attending
(:mod:`kvpress_like.query_tap`, how a one-pass prefill scores without projecting its window again).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvpress_like.errors import UnsupportedModelError

COMPRESSED_ATTENTION = "kvpress_like"
BASES = ("sdpa", "eager")
_BASE_ATTRIBUTE = "kvpress_like_base_attention"
QUERY_TAP = "kvpress_like_query_tap"


@dataclass
class MaskedKV:
    """Keys ``[batch, kv_heads, T, head_dim]`` of one layer and which rows are real, ``[batch, 1 | kv_heads, T]``.

    The last rows are those of the current forward; ``mark_new_rows(valid)`` records which of them were
    padding (``valid`` ``[batch, q]``), so later steps never attend to them. ``after_attention(query, valid)``,
    when set, is told the forward's post-RoPE queries once the layer's attention has run (decode-time
    compression reads its window there, :mod:`kvpress_like.decode_compression`).
    """

    keys: torch.Tensor
    valid: torch.Tensor
    mark_new_rows: Callable[[torch.Tensor], None]
    after_attention: Callable[[torch.Tensor, torch.Tensor | None], None] | None = None  # (query, new rows' validity)
    all_valid: bool = False  # every row is real (a dense layer of an unpadded batch): a one-token step needs no mask

    def __getattr__(self, name: str):
        raise UnsupportedModelError(
            "this compressed cache has layers of different lengths (per-layer, per-head or per-sequence budgets) "
            f"that only the {COMPRESSED_ATTENTION!r} attention can read; the model's attention implementation was "
            "changed since the prefill: call kvpress_like.use_compressed_attention(model) before decoding"
        )


@dataclass
class MaskBundle:
    """What the ``kvpress_like`` mask function hands every layer: the original implementation's mask, and the
    validity ``[batch, q]`` of the forward's own rows (from the 2-D attention mask, ``None`` = all real)."""

    standard: torch.Tensor | None
    new_valid: torch.Tensor | None


def layer_mask(valid: torch.Tensor, q_length: int, new_valid: torch.Tensor | None) -> torch.Tensor:
    """``[batch, heads, q, T]`` bool: row ``j`` of the forward sees the valid rows up to its own (``T−q+j``).

    A padding row of the forward sees itself only (its output is never used; a row that sees nothing
    would turn into NaN).
    """
    total = valid.shape[-1]
    if new_valid is not None:
        valid = valid.clone()
        valid[..., total - q_length :] &= new_valid.to(valid.device)[:, None, :]
    own_row = torch.arange(total - q_length, total, device=valid.device)[:, None]
    columns = torch.arange(total, device=valid.device)[None, :]
    visible = valid[:, :, None, :] & (columns <= own_row)
    return visible | (columns == own_row)


def _base(module: torch.nn.Module) -> str:
    return getattr(module.config, _BASE_ATTRIBUTE, "sdpa")


def _base_attention(module: torch.nn.Module) -> Callable:
    name = _base(module)
    if name == "eager":  # each modeling file has its own eager function (soft-capping, dropout, …)
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def compressed_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """The original attention, with this layer's own mask when the cache hands a :class:`MaskedKV`; the module's
    query tap, if it has one, sees ``query`` first."""
    tap = getattr(module, QUERY_TAP, None)
    if tap is not None:
        tap(module, query)
    bundle = attention_mask if isinstance(attention_mask, MaskBundle) else MaskBundle(attention_mask, None)
    if not isinstance(key, MaskedKV):
        return _base_attention(module)(module, query, key, value, bundle.standard, **kwargs)
    q_length = query.shape[2]
    new_valid = None if bundle.new_valid is None else bundle.new_valid[:, -q_length:]
    if new_valid is not None:
        key.mark_new_rows(new_valid)
    if q_length == 1 and key.all_valid and (new_valid is None or bool(new_valid.all())):
        output = _base_attention(module)(module, query, key.keys, value, None, **kwargs)  # sees every row
    else:
        output = _base_attention(module)(module, query, key.keys, value, _own_mask(module, query, key, new_valid),
                                         **kwargs)
    if key.after_attention is not None:
        key.after_attention(query, new_valid)
    return output


def _own_mask(module, query: torch.Tensor, key: MaskedKV, new_valid: torch.Tensor | None) -> torch.Tensor:
    """The layer's mask ``[batch, q_heads, q, T]`` (bool for sdpa, additive for eager) from its rows' validity."""
    visible = layer_mask(key.valid, query.shape[2], new_valid)
    group = query.shape[1] // visible.shape[1] if visible.shape[1] > 1 else 1
    visible = visible.repeat_interleave(group, dim=1)
    if _base(module) == "eager":
        visible = torch.zeros(visible.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~visible, torch.finfo(query.dtype).min
        )
    return visible


def compressed_mask(*args, attention_mask=None, q_length: int = 0, **kwargs) -> MaskBundle:
    """The original implementation's mask, bundled with the forward rows' validity from the 2-D mask."""
    config = kwargs.get("config")
    base = eager_mask if getattr(config, _BASE_ATTRIBUTE, "sdpa") == "eager" else sdpa_mask
    standard = base(*args, attention_mask=attention_mask, q_length=q_length, **kwargs)
    new_valid = None if attention_mask is None else attention_mask[:, -q_length:].bool()
    return MaskBundle(standard, new_valid)


AttentionInterface.register(COMPRESSED_ATTENTION, compressed_attention_forward)
AttentionMaskInterface.register(COMPRESSED_ATTENTION, compressed_mask)


def can_wrap(model) -> bool:
    """Whether ``model`` uses (or can switch to) the ``kvpress_like`` attention: its attention is one of
    :data:`BASES` or already this one."""
    return model.config._attn_implementation in (*BASES, COMPRESSED_ATTENTION)


def use_compressed_attention(model) -> None:
    """Switch ``model`` to the ``kvpress_like`` attention (a no-op if it already uses it)."""
    current = model.config._attn_implementation
    if current == COMPRESSED_ATTENTION:
        return
    if not can_wrap(model):
        raise UnsupportedModelError(
            f"this compressed cache needs per-layer attention masks, written for the {' and '.join(BASES)} "
            f"backends; the model uses {current!r}. Load it with attn_implementation='sdpa' (flash_attention_2 "
            "support needs its variable-length path, not written yet), or compress with uniform budgets"
        )
    model.set_attn_implementation(COMPRESSED_ATTENTION)
    for config in _configs(model):
        setattr(config, _BASE_ATTRIBUTE, current)


def restore_attention(model) -> None:
    """Switch ``model`` back to the attention it used before :func:`use_compressed_attention`."""
    if model.config._attn_implementation != COMPRESSED_ATTENTION:
        return
    model.set_attn_implementation(getattr(model.config, _BASE_ATTRIBUTE, "sdpa"))


@contextmanager
def compressed_attention(model, cache=None):
    """Run ``model`` with the ``kvpress_like`` attention when ``cache`` needs it; the previous one is restored."""
    if cache is not None and not getattr(cache, "own_masks", False):
        yield model
        return
    previous = model.config._attn_implementation
    use_compressed_attention(model)
    try:
        yield model
    finally:
        if previous != COMPRESSED_ATTENTION:
            restore_attention(model)


def _configs(model) -> list:
    configs = [module.config for module in model.modules() if hasattr(module, "config")]
    return list({id(c): c for c in configs}.values())
