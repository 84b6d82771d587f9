"""``observed_attention`` — mean attention each key receives from the prompt's queries (H2O-like).

kvpress's ``ObservedAttentionPress``, after Zhang et al. 2023 (H2O, arXiv 2306.14048): the attention every prompt
query pays each key, summed and divided by the number of queries that see the key, averaged over the KV group.
No recent window (H2O's ``h2o`` method keeps half of the budget for one).
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods_spec import MethodSpec, PartChoice

OBSERVED_ATTENTION = MethodSpec(
    name="observed_attention",
    summary="mean causal attention received from every prompt query (H2O-like), no recent window",
    paper="Zhang et al. 2023, arXiv 2306.14048 (kvpress ObservedAttentionPress)",
    departures="attention recomputed in query chunks on any backend (kvpress needs eager and output_attentions)",
    window=PartChoice(name="prompt"),
    scorer=PartChoice(name="accumulated", options={"aggregation": "mean"}),
)


@hookimpl
def register_methods():
    return [OBSERVED_ATTENTION]
