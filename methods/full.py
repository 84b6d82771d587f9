"""``full`` — no compression: every prompt token is kept (the baseline every evaluation compares to).

The window and scorer are never run: the ``full`` allocator gives every layer the whole prompt, and the
method takes no budget.
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods_spec import MethodSpec, PartChoice

FULL = MethodSpec(
    name="full",
    summary="no compression: the full cache (the reference for every evaluation)",
    window=PartChoice(name="none"),
    scorer=PartChoice(name="recency"),
    allocator=PartChoice(name="full"),
)


@hookimpl
def register_methods():
    return [FULL]
