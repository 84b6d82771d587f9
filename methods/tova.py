"""``tova`` — the last token's attention, averaged over all heads, decides.

Oren et al. 2024, "Transformers are Multi-State RNNs" (Token Omission Via Attention). One kept set is
shared by every head of a layer. Applied once at prefill (the paper evicts one token per decoding step).
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods_spec import MethodSpec, PartChoice

TOVA = MethodSpec(
    name="tova",
    summary="attention of the last prompt token, averaged over all heads",
    paper="Oren et al. 2024, arXiv 2401.06104",
    departures="one-shot at prefill instead of one eviction per decoding step",
    window=PartChoice(name="suffix", options={"size": 1}),
    scorer=PartChoice(name="attention", options={"gqa": "all_heads"}),
)


@hookimpl
def register_methods():
    return [TOVA]
