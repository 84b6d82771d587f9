"""``dapq_pyramid`` — DapQ's pseudo-query window and scorer with PyramidKV's allocator.

A combination no paper ran: Tian et al. 2026 (arXiv 2603.11564) for the scores, Cai et al. 2024
(arXiv 2406.02069) for the per-layer budgets (β = 20, nothing reserved since DapQ keeps no window).
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods.dapq import DAPQ
from kvpress_like.methods_spec import PartChoice

DAPQ_PYRAMID = DAPQ.variant(
    "dapq_pyramid",
    "DapQ's pseudo queries with pyramid per-layer budgets",
    "Cai et al. 2024, arXiv 2406.02069",
    allocator=PartChoice(name="pyramid", options={"beta": 20.0}),
)


@hookimpl
def register_methods():
    return [DAPQ_PYRAMID]
