"""``h2o`` — heavy hitters (attention received from every prompt query) plus recent tokens.

Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models". Half of the budget goes to the most recent tokens, half to the keys with the largest
accumulated attention. Applied once at prefill (the paper also evicts during decoding).
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods_spec import MethodSpec, PartChoice

H2O = MethodSpec(
    name="h2o",
    summary="accumulated attention from all prompt queries (heavy hitters) + a recent half of the budget",
    paper="Zhang et al. 2023, arXiv 2306.14048",
    departures="one-shot at prefill; attention computed in query chunks instead of materialised",
    window=PartChoice(name="prompt"),
    scorer=PartChoice(name="accumulated"),
    selector=PartChoice(name="topk", options={"recent_fraction": 0.5}),
)


@hookimpl
def register_methods():
    return [H2O]
