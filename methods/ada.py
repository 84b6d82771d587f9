"""``ada_snapkv`` and ``ada_dapq`` — head-adaptive budgets on SnapKV's and DapQ's scores.

Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
Inference" (arXiv 2407.11550): a layer's budget is shared by its KV heads through a global top-k, each
head keeping a safeguard share α = 0.2. The cache stores each head's own number of entries (ragged layers:
no padding in storage); decoding reads them through the ``kvpress_like`` attention, which pads the heads to one
length and masks the padding.
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods.dapq import DAPQ
from kvpress_like.methods.snapkv import SNAPKV
from kvpress_like.methods_spec import MethodSpec, PartChoice


def head_adaptive(base: MethodSpec) -> MethodSpec:
    """``base`` with its uniform allocator replaced by Ada-KV's head-adaptive one."""
    return base.variant(
        f"ada_{base.name}",
        f"{base.name} scores with head-adaptive budgets (Ada-KV, α = 0.2)",
        "Feng et al. 2024, arXiv 2407.11550",
        departures="selection is per (sequence, head) with the selector's protected tokens counted first",
        allocator=PartChoice(name="head_adaptive", options={"alpha": 0.2}),
    )


@hookimpl
def register_methods():
    return [head_adaptive(SNAPKV), head_adaptive(DAPQ)]
