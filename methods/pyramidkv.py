"""``pyramidkv`` — SnapKV's scores with budgets that shrink from the lower to the upper layers.

Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
(arXiv 2406.02069). β = 20; the 32 window tokens are reserved in every layer; the total equals
layers × budget.
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods.snapkv import SNAPKV
from kvpress_like.methods_spec import PartChoice

PYRAMIDKV = SNAPKV.model_copy(
    update={
        "name": "pyramidkv",
        "summary": "SnapKV with per-layer budgets falling linearly with depth (β = 20)",
        "paper": "Cai et al. 2024, arXiv 2406.02069",
        "departures": "shares rounded so the total is exactly layers × budget; layers capped at the prompt length",
        "allocator": PartChoice(name="pyramid", options={"beta": 20.0, "reserved": 32}),
    }
)


@hookimpl
def register_methods():
    return [PYRAMIDKV]
