"""``snapkv_chunk`` and ``dapq_chunk`` — SnapKV's and DapQ's scores, kept in whole chunks.

ChunkKV (Liu et al. 2025, "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context
LLM Inference"): selecting chunks of consecutive tokens rather than single tokens keeps multi-token
facts (a five-digit number is five tokens on SmolLM2) intact. Chunks of 16 tokens, ranked by the mean
score of their tokens, per KV head.
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods.dapq import DAPQ
from kvpress_like.methods.snapkv import SNAPKV
from kvpress_like.methods_spec import MethodSpec, PartChoice


def chunked(base: MethodSpec, chunk_size: int = 16) -> MethodSpec:
    """``base`` with its top-k selector replaced by whole-chunk selection (same protected tokens)."""
    options = {**base.selector.options, "chunk_size": chunk_size, "aggregation": "mean"}
    return base.variant(
        f"{base.name}_chunk",
        f"{base.name} scores, whole chunks of {chunk_size} tokens kept (ChunkKV selection)",
        "Liu et al. 2025, ChunkKV",
        selector=PartChoice(name="chunk", options=options),
    )


@hookimpl
def register_methods():
    return [chunked(SNAPKV), chunked(DAPQ)]
