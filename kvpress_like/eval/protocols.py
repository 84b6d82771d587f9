"""The two evaluation protocols, and the cache operations the harness needs on top of the core.

* ``question_aware`` — the question (and the answer prefix) is inside the compressed prompt: the whole
  templated prompt is compressed, the first answer token comes from its last position (DapQ's setting).
* ``query_agnostic`` — only the context part (template head + context + separator) is compressed; the
  question, the rest of the template and the answer prefix are fed afterwards through the compressed
  cache (kvpress's setting: one compressed context serves any later question).

An *answer prefix* (``sample.meta["answer_prefix"]``, e.g. "The special magic number is") opens the
assistant turn in both protocols, so the model answers in a few tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers.cache_utils import DynamicLayer

from kvpress_like.attention import compressed_attention
from kvpress_like.cache import CompressedCache
from kvpress_like.compat import model_inputs
from kvpress_like.decoding import GenerationOptions, decode_batch
from kvpress_like.errors import ConfigError
from kvpress_like.prefill import shallow_copy
from kvpress_like.prompting import build_prompt

Protocol = Literal["question_aware", "query_agnostic"]
PROTOCOLS: tuple[str, ...] = ("question_aware", "query_agnostic")


@dataclass(frozen=True)
class PreparedPrompt:
    """``input_ids`` ``[1, T]`` (prompt + answer prefix); the first ``compress_length`` ids are compressed."""

    input_ids: torch.Tensor
    compress_length: int
    question_span: tuple[int, int] | None
    protocol: str

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; valid protocols are: {', '.join(PROTOCOLS)}")
    return protocol


def prepare(tokenizer, sample, protocol: str, answer_prefix: bool = True) -> PreparedPrompt:
    """Token ids of ``sample`` under ``protocol`` (chat template applied), with its answer prefix."""
    check_protocol(protocol)
    prompt = build_prompt(tokenizer, sample.context, sample.question)
    ids = prompt.input_ids
    prefix = sample.answer_prefix if answer_prefix else ""
    if prefix:
        prefix_ids = tokenizer.encode(prefix, add_special_tokens=False)
        ids = torch.cat([ids, torch.tensor([prefix_ids], dtype=torch.long)], dim=1)
    if protocol == "question_aware":
        return PreparedPrompt(ids, ids.shape[1], prompt.question_span, protocol)
    return PreparedPrompt(ids, prompt.context_length, None, protocol)


# ------------------------------------------------------------------------------------------------
# Cache helpers: fork (copy-on-write), stack several caches into one batch, pick rows of a batch.
# ------------------------------------------------------------------------------------------------


def signature(cache: CompressedCache) -> tuple | None:
    """Per-layer physical shapes and logical lengths; ``None`` when the cache cannot be stacked in a batch."""
    parts = []
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer or getattr(layer, "keys", None) is None:
            return None
        parts.append((tuple(layer.keys.shape), cache.get_seq_length(i)))
    return tuple(parts)


def stack(model, caches: list[CompressedCache]) -> CompressedCache:
    """One batched cache from caches of equal :func:`signature` (batch 1 each)."""
    if len(caches) == 1:
        return caches[0]
    out = CompressedCache(model.config)
    for i in range(len(caches[0].layers)):
        keys = torch.cat([c.layers[i].keys for c in caches], dim=0)
        values = torch.cat([c.layers[i].values for c in caches], dim=0)
        out.replace_layer(i, keys, values, seen=caches[0].get_seq_length(i))
    out.own_masks = any(c.own_masks for c in caches)
    return out


def select_rows(model, cache: CompressedCache, rows: list[int]) -> CompressedCache:
    """The batch rows ``rows`` of a stacked cache (a shallow copy when every row is taken)."""
    if rows == list(range(cache.layers[0].keys.shape[0])):
        return shallow_copy(cache)
    index = torch.tensor(rows, device=cache.layers[0].keys.device)
    out = CompressedCache(model.config)
    for i, layer in enumerate(cache.layers):
        out.replace_layer(i, layer.keys.index_select(0, index), layer.values.index_select(0, index),
                          seen=cache.get_seq_length(i))
    out.own_masks = cache.own_masks
    return out


# ------------------------------------------------------------------------------------------------
# Forward helpers that work on every cache the core produces (dense, per-layer uneven, ragged).
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def logits_along(model, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Feed ``ids`` ``[batch, t]`` at positions ``start…`` into ``cache``; logits of every row ``[batch, t, V]``.

    Compressed caches run under :mod:`kvpress_like.attention` (each layer masked by its own rows).
    """
    batch, length = ids.shape
    positions = torch.arange(start, start + length, device=model.device).expand(batch, length)
    with compressed_attention(model, cache):
        return model(**model_inputs(model, cache, input_ids=ids.to(model.device), position_ids=positions,
                                    logits_to_keep=0)).logits


@torch.no_grad()
def greedy(model, cache, first_logits: torch.Tensor, max_new_tokens: int, eos: set[int]) -> list[list[int]]:
    """Greedy answers of a batch ``[batch, V]``: each row stops at its first EOS or after ``max_new_tokens``."""
    return decode_batch(model, cache, first_logits, max_new_tokens, GenerationOptions(), eos)
