"""``dapq_plus`` — DapQ's pseudo queries joined by SnapKV's window, pooled, kept in whole chunks, ends protected.

Built from the framework's parts on the evidence of ``docs/results/research.md`` (SmolLM2-135M-Instruct):

* window ``union``: the paper's 32 position-aware pseudo queries (Tian et al. 2026, arXiv 2603.11564)
  together with the last 32 real prompt queries (SnapKV, Li et al. 2024). On SmolLM2 the pseudo
  queries put about two thirds of their attention on the prompt tokens their content was copied
  from, so alone they find the needle less often than the real window does;
* scores average-pooled with kernel 7 over the keys before the window;
* whole chunks of 16 tokens kept (ChunkKV selection, Liu et al. 2025), so multi-token facts such as a
  five-digit number (five tokens) survive per head;
* the first 4 tokens (attention sinks) and the last 32 (question and assistant header in the
  question-aware protocol) always kept.
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods.dapq import DAPQ
from kvpress_like.methods_spec import PartChoice

DAPQ_PLUS = DAPQ.variant(
    "dapq_plus",
    "DapQ's pseudo queries + SnapKV's window, pooled scores, whole 16-token chunks, sinks and last 32 kept",
    "Li et al. 2024 (SnapKV window) and Liu et al. 2025 (ChunkKV)",
    departures="not the paper's method: union window, pooling, chunk selection and protected ends (research.md)",
    window=PartChoice(name="union", options={**DAPQ.window.options, "size": 32}),
    scorer=PartChoice(name="attention", options={**DAPQ.scorer.options, "pooling": "avg", "kernel": 7}),
    selector=PartChoice(name="chunk", options={"chunk_size": 16, "aggregation": "mean", "sinks": 4, "recent": 32}),
)


@hookimpl
def register_methods():
    return [DAPQ_PLUS]
