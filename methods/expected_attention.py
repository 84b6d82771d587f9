"""``expected_attention`` — keep what future queries are expected to attend to.

Devoto et al. 2025 (kvpress's Expected Attention): prompt query statistics rotated by the RoPE averaged
over the next 512 positions, closed-form expected softmax × value norm; 4 sink tokens protected.
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods_spec import MethodSpec, PartChoice

EXPECTED_ATTENTION = MethodSpec(
    name="expected_attention",
    summary="expected attention of future queries (Gaussian query statistics, averaged future RoPE) × ‖v‖",
    paper="Devoto et al. 2025, Expected Attention (kvpress)",
    departures="per-KV-head uniform budget (kvpress pairs it with AdaKV by default)",
    window=PartChoice(name="none"),
    scorer=PartChoice(name="expected_attention"),
    selector=PartChoice(name="topk", options={"sinks": 4}),
)


@hookimpl
def register_methods():
    return [EXPECTED_ATTENTION]
