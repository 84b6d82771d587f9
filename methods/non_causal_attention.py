"""``non_causal_attention`` — bidirectional attention inside 256-token prompt chunks, × ‖v‖ (Compactor's part).

Chari & Van Durme 2025, "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage
Scores" (arXiv 2507.08143); kvpress's ``NonCausalAttnPress``.
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods_spec import MethodSpec, PartChoice

NON_CAUSAL_ATTENTION = MethodSpec(
    name="non_causal_attention",
    summary="non-causal attention of the prompt's queries inside 256-row chunks, × ‖v‖, pooled, z-scored",
    paper="Chari & Van Durme 2025, arXiv 2507.08143",
    departures="z-score per sequence instead of over the batch (no effect on a head's ranking)",
    window=PartChoice(name="prompt"),
    scorer=PartChoice(name="non_causal_attention"),
)


@hookimpl
def register_methods():
    return [NON_CAUSAL_ATTENTION]
