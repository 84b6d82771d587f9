"""One batched prefill, then each sequence on its own: split a batch result into batch-1 results.

A batch prefill (left-padded or not) compresses each sequence exactly as it would alone; splitting its
result gives, per sequence, the cache, next-token logits and report that prefilling that sequence alone
gives (without its padding, in its own positions), so each can be continued, copied or measured on its
own — the evaluation harness batches its samples' prompt forward this way. Timing and the peak bytes
stay those of the whole batch (the work was shared).
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from kvpress_like.cache import CompressedCache
from kvpress_like.errors import UnsupportedInputError
from kvpress_like.prefill import PrefillResult, hand_over
from kvpress_like.ragged import RaggedLayer
from kvpress_like.report import CompressionReport, LayerReport


def split_batch(model, result: PrefillResult) -> list[PrefillResult]:
    """``result`` of a prefill of ``[batch, L]`` ids as ``batch`` results of ``[1, L_b]`` ids, one per sequence.

    Only a cache straight from a prefill splits (nothing fed since): its layers still describe the prompt.
    """
    report = result.report
    batch = result.next_token_logits.shape[0]
    lengths = report.sequence_lengths or [report.prompt_length] * batch
    if any(result.cache.get_seq_length(i) != report.prompt_length for i in range(len(result.cache.layers))):
        raise UnsupportedInputError("only a cache straight from a prefill can be split into its sequences; "
                                    "split before feeding it")
    out = []
    for b, length in enumerate(lengths):
        cache = _sequence_cache(model, result.cache, b, report.prompt_length - length, length)
        out.append(PrefillResult(cache, result.next_token_logits[b : b + 1], _sequence_report(report, b, cache)))
    return out


def _sequence_cache(model, batch_cache: CompressedCache, b: int, pad: int, length: int) -> CompressedCache:
    """Sequence ``b``'s rows of every layer, without its ``pad`` rows of left padding, as a batch-1 cache."""
    cache = CompressedCache(model.config)
    padded_length = length + pad
    for i, layer in enumerate(batch_cache.layers):
        if isinstance(layer, RaggedLayer):
            keys, values = layer.key_parts[b], layer.value_parts[b]
            if len({part.shape[0] for part in keys}) == 1:  # every head kept as many rows: a dense layer
                cache.replace_layer(i, torch.stack(keys)[None], torch.stack(values)[None], seen=length)
            else:
                cache.replace_with_ragged(i, RaggedLayer([keys], [values]), seen=length)
        elif getattr(layer, "is_sliding", False):  # the last rows of the padded prompt: drop the padding among them
            held = layer.keys.shape[-2]
            first = max(0, pad - (padded_length - held))
            twin = copy.copy(layer)
            twin.keys, twin.values = layer.keys[b : b + 1, :, first:], layer.values[b : b + 1, :, first:]
            twin.cumulative_length = length
            cache.layers[i] = twin
        else:  # dense: an unpadded batch, or a layer left whole (a padded prefill stores pruned layers ragged)
            cache.replace_layer(i, layer.keys[b : b + 1, :, pad:], layer.values[b : b + 1, :, pad:],
                                seen=length)
    hand_over(model, cache)
    return cache


def _sequence_report(report: CompressionReport, b: int, cache: CompressedCache) -> CompressionReport:
    """What prefilling sequence ``b`` alone reports (timing and peak bytes: the batch's)."""
    padded = report.sequence_lengths is not None
    length = report.sequence_lengths[b] if padded else report.prompt_length
    layers = {
        i: LayerReport(i, _kept_row(layer.kept_indices, b), layer.budget[b] if padded else layer.budget,
                       layer.seconds)
        for i, layer in report.layers.items()
    }
    return dataclasses.replace(
        report, prompt_length=length, budget=report.budget[b] if padded else report.budget, layers=layers,
        cache_bytes_before=cache.uncompressed_nbytes(length, layers), cache_bytes_after=cache.nbytes(),
        sequence_lengths=None,
    )


def _kept_row(kept, b: int):
    """Sequence ``b``'s kept indices: ``[1, heads, k]``, or per-head lists when its heads kept different counts."""
    if isinstance(kept, torch.Tensor):
        return kept[b : b + 1]
    row = kept[b]
    return torch.stack(row)[None] if len({index.shape[0] for index in row}) == 1 else [row]
