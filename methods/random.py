"""``random`` — seeded random eviction, the floor every ablation should beat."""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods_spec import MethodSpec, PartChoice

RANDOM = MethodSpec(
    name="random",
    summary="seeded random scores (a floor for every ablation)",
    window=PartChoice(name="none"),
    scorer=PartChoice(name="random"),
)


@hookimpl
def register_methods():
    return [RANDOM]
