"""What one compressed prefill did, layer by layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerReport:
    """One layer: kept prompt indices ``[batch, kv_heads, k]`` (sorted, original positions) and timing."""

    layer_idx: int
    kept_indices: torch.Tensor
    budget: int
    seconds: float


@dataclass
class CompressionReport:
    """Per-layer kept indices and budgets, cache bytes before/after, timings.

    ``seconds`` is the time spent compressing (scoring, selecting, pruning, and running any appended
    window rows); ``prefill_seconds`` is the prompt forward itself, shared when several pipelines
    compress one prompt.
    """

    method: str
    prompt_length: int
    budget: int
    layers: dict[int, LayerReport] = field(default_factory=dict)
    uncompressed_layers: list[int] = field(default_factory=list)
    cache_bytes_before: int = 0
    cache_bytes_after: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0

    @property
    def kept_indices(self) -> dict[int, torch.Tensor]:
        return {idx: layer.kept_indices for idx, layer in self.layers.items()}

    @property
    def budget_per_layer(self) -> dict[int, int]:
        return {idx: layer.budget for idx, layer in self.layers.items()}

    @property
    def compression_ratio(self) -> float:
        """Fraction of the prompt's cache bytes that were freed."""
        if not self.cache_bytes_before:
            return 0.0
        return 1 - self.cache_bytes_after / self.cache_bytes_before

    def summary(self) -> str:
        return (
            f"{self.method}: prompt {self.prompt_length} tokens, budget {self.budget} per KV head, "
            f"{len(self.layers)} layers compressed, cache {self.cache_bytes_before / 2**20:.2f} MiB -> "
            f"{self.cache_bytes_after / 2**20:.2f} MiB, prefill {self.prefill_seconds:.2f} s + "
            f"compression {self.seconds:.2f} s"
        )
