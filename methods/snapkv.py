"""``snapkv`` — the last 32 prompt tokens vote for the keys to keep.

Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation". Scores are the sum of
the window's causal softmax attention on the earlier keys, averaged over each KV group's query heads,
then average-pooled with kernel 7 (stride 1, zero padding counted); the window itself is always kept
and counts inside the budget.
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods_spec import MethodSpec, PartChoice

SNAPKV = MethodSpec(
    name="snapkv",
    summary="observation window of the last 32 prompt tokens, pooled attention scores, window kept",
    paper="Li et al. 2024, arXiv 2404.14469",
    departures="GQA groups averaged instead of repeating KV heads (the cache stays at KV-head granularity)",
    window=PartChoice(name="suffix", options={"size": 32}),
    scorer=PartChoice(name="attention", options={"aggregation": "sum", "gqa": "mean", "pooling": "avg", "kernel": 7}),
    selector=PartChoice(name="topk", options={"recent": 32}),
)


@hookimpl
def register_methods():
    return [SNAPKV]
