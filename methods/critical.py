"""``critical_snapkv`` and ``critical_dapq`` — attention re-weighted by the projected value norm.

Feng et al. 2025, "Identify Critical KV Cache in LLM Inference from an Output Perturbation Perspective"
(CriticalKV): half of the budget by plain attention, the rest by attention × ‖W_o v‖₁. Applied here to
SnapKV's window and to DapQ's pseudo queries.
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods.dapq import DAPQ
from kvpress_like.methods.snapkv import SNAPKV
from kvpress_like.methods_spec import MethodSpec, PartChoice


def critical(base: MethodSpec) -> MethodSpec:
    """``base`` with the CriticalKV re-weighting as scorer (same options) and its two-stage selection as
    selector (same protected tokens)."""
    return base.variant(
        f"critical_{base.name}",
        f"{base.name} scores × projected value norm, two-stage selection (CriticalKV)",
        "Feng et al. 2025, CriticalKV",
        scorer=PartChoice(name="critical", options=base.scorer.options),
        selector=PartChoice(name="critical", options={**base.selector.options, "first_stage_ratio": 0.5}),
    )


@hookimpl
def register_methods():
    return [critical(SNAPKV), critical(DAPQ)]
