"""``cur`` — approximate CUR leverage of keys and values (CurDKV), 4 sinks protected.

Sengupta et al. 2025, "Value-Guided KV Compression for LLMs via Approximated CUR Decomposition"
(arXiv 2509.15038); kvpress's ``CURPress`` defaults (kv_product, local windows of 16, 4 sinks).
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods_spec import MethodSpec, PartChoice

CUR = MethodSpec(
    name="cur",
    summary="‖k‖²·‖v‖² leverage normalised in 16-token windows; 4 sinks",
    paper="Sengupta et al. 2025, arXiv 2509.15038",
    departures="sinks protected by the selector instead of scored 1; no random-projection variant",
    window=PartChoice(name="none"),
    scorer=PartChoice(name="cur"),
    selector=PartChoice(name="topk", options={"sinks": 4}),
)


@hookimpl
def register_methods():
    return [CUR]
