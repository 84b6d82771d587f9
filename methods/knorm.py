"""``knorm`` — keep the keys with the lowest L2 norm.

Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression".
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods_spec import MethodSpec, PartChoice

KNORM = MethodSpec(
    name="knorm",
    summary="keys with the lowest L2 norm are kept",
    paper="Devoto et al. 2024, arXiv 2406.11430",
    window=PartChoice(name="none"),
    scorer=PartChoice(name="key_norm"),
)


@hookimpl
def register_methods():
    return [KNORM]
