"""Budget allocators: how many prompt tokens each compressed layer keeps."""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.parts import Allocator


class UniformAllocator(Allocator):
    """Every layer and KV head keeps ``min(budget, L)`` tokens (SnapKV, DapQ)."""

    name = "uniform"
    summary = "the same budget for every layer and KV head"

    def layer_budgets(self, num_layers: int, prompt_length: int, budget_tokens: int) -> list[int]:
        return [min(budget_tokens, prompt_length)] * num_layers


@hookimpl
def register_allocators():
    return [UniformAllocator]
