"""``cap`` — query-weighted log-det capacity of the values (CapKV); 4 sinks scored first.

"CAPKV" (arXiv 2604.25975) as kvpress's ``CapPress`` computes it (τ = 5, 512 future positions, 4 sinks).
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods_spec import MethodSpec, PartChoice

CAP = MethodSpec(
    name="cap",
    summary="w·vᵀ(I + Σ w v vᵀ)⁻¹v with w = exp(τ·cos(k, averaged-RoPE query mean)); 4 sinks first",
    paper="CAPKV, arXiv 2604.25975 (kvpress CapPress)",
    departures="kvpress's: cosine alignment, max shift, averaged future RoPE, u = v; sink maximum per sequence "
    "instead of over the batch",
    window=PartChoice(name="none"),
    scorer=PartChoice(name="cap"),
)


@hookimpl
def register_methods():
    return [CAP]
