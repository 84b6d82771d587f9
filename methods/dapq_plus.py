"""``dapq_plus`` — DapQ's position-aware pseudo queries, kept in whole chunks, with the prompt's ends protected.

Built from the framework's parts on the evidence of ``docs/results/research.md`` (SmolLM2-135M): the
paper's pseudo queries (Tian et al. 2026, arXiv 2603.11564) score the keys; scores are average-pooled
(kernel 7) and whole chunks of 16 tokens are kept (ChunkKV selection, Liu et al. 2025), so multi-token
facts such as a five-digit number survive; the first 4 tokens (attention sinks) and the last 32 (the
question and the chat template's assistant header, in the question-aware protocol) are always kept.
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods.dapq import DAPQ
from kvpress_like.methods_spec import PartChoice

DAPQ_PLUS = DAPQ.variant(
    "dapq_plus",
    "DapQ scores, average-pooled, kept in whole 16-token chunks, sinks and last 32 tokens protected",
    "Liu et al. 2025, ChunkKV",
    departures="not the paper's method: pooling, chunk selection and protected ends were added (see research.md)",
    scorer=PartChoice(name="attention", options={**DAPQ.scorer.options, "pooling": "avg", "kernel": 7}),
    selector=PartChoice(name="chunk", options={"chunk_size": 16, "aggregation": "mean", "sinks": 4, "recent": 32}),
)


@hookimpl
def register_methods():
    return [DAPQ_PLUS]
