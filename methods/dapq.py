"""DapQ — decoding-aligned KV cache compression via position-aware pseudo queries.

Tian, Su, Li, Zhang, "Where Matters More Than What: Decoding-aligned KV Cache Compression via
Position-aware Pseudo Queries", arXiv 2603.11564 (2026). N = 32 pseudo tokens (first 4 + last 28
prompt ids) appended at positions L … L+31, scored by the summed post-RoPE softmax attention of
those queries (Eq. 4), top-K per KV head and layer over the whole prompt (Eq. 5), pseudo KV dropped.

Where the paper is silent (its §6 ambiguities), the default is the best reading and an option:
GQA groups are averaged (``scorer.gqa``), no pooling (``scorer.pooling``), the softmax covers every
key a pseudo query sees (``scorer.softmax_domain``), nothing is force-kept (``selector.sinks`` /
``selector.recent``), the content comes from the final tokenised (templated) input.
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods_spec import MethodSpec, PartChoice

DAPQ = MethodSpec(
    name="dapq",
    summary="position-aware pseudo queries at the future decoding positions score the prompt's keys",
    paper="Tian et al. 2026, arXiv 2603.11564",
    departures="none known; GQA mean, no pooling and the visible-key softmax are readings of §6",
    window=PartChoice(name="pseudo", options={"n_pseudo": 32, "prefix": 4}),
    scorer=PartChoice(name="attention", options={"aggregation": "sum", "gqa": "mean", "pooling": "none"}),
    allocator=PartChoice(name="uniform"),
    selector=PartChoice(name="topk"),
)


DAPQ_REAIMED = DAPQ.variant(
    "dapq_reaimed",
    "the prompt's last 32 queries rotated to DapQ's positions L … L+31: DapQ's alignment, no extra rows",
    "position re-aiming (this project)",
    window=PartChoice(name="reaimed", options={"size": 32}),
    departures="real queries instead of pseudo tokens, moved by RoPE rotation; no appended forward rows",
)


@hookimpl
def register_methods():
    return [DAPQ, DAPQ_REAIMED]
