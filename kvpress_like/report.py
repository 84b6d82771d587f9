"""What one compressed prefill did, layer by layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerReport:
    """One layer: kept prompt indices (sorted, original positions), its budget per KV head and timing.

    ``kept_indices`` is a LongTensor ``[batch, kv_heads, k]``; with head-adaptive budgets each (sequence,
    head) keeps its own number of tokens and it is a list (batch) of lists (heads) of 1-D LongTensors.
    """

    layer_idx: int
    kept_indices: torch.Tensor | list[list[torch.Tensor]]
    budget: int | list[int]
    seconds: float

    def kept_mask(self, prompt_length: int) -> torch.Tensor:
        """``[batch, kv_heads, prompt_length]`` bool, True where a prompt token was kept."""
        if isinstance(self.kept_indices, torch.Tensor):
            batch, heads = self.kept_indices.shape[:2]
            mask = torch.zeros(batch, heads, prompt_length, dtype=torch.bool, device=self.kept_indices.device)
            return mask.scatter_(-1, self.kept_indices, True)
        rows = self.kept_indices
        mask = torch.zeros(len(rows), len(rows[0]), prompt_length, dtype=torch.bool)
        for b, row in enumerate(rows):
            for h, index in enumerate(row):
                mask[b, h, index.cpu()] = True
        return mask

    @property
    def kept_counts(self) -> torch.Tensor:
        """Tokens kept per (sequence, KV head), ``[batch, kv_heads]``."""
        if isinstance(self.kept_indices, torch.Tensor):
            return torch.full(self.kept_indices.shape[:2], self.kept_indices.shape[-1])
        return torch.tensor([[len(index) for index in row] for row in self.kept_indices])


@dataclass
class CompressionReport:
    """Per-layer kept indices and budgets, cache bytes before/after and at the peak, timings.

    ``seconds`` is the time spent compressing (scoring, selecting, pruning; in :func:`prefill_many`
    also running a window's appended rows); ``prefill_seconds`` is the rest of the forward, shared when
    several pipelines compress one prompt. ``cache_bytes_before`` is what the uncompressed prefill would
    hold, ``cache_bytes_after`` what the compressed cache holds, ``peak_cache_bytes`` the most key/value
    bytes held at any moment of the prefill (tracked by the cache itself, so deterministic).
    ``shared_full_cache`` marks a prefill that held the prompt's full cache to serve several pipelines
    (:func:`~kvpress_like.prefill_many`); ``chunk_size`` is the row chunk of a chunked prefill,
    ``prompt_chunk`` the chunk of a progressive one (:mod:`kvpress_like.progressive`). For a
    left-padded batch ``prompt_length`` is the padded length, ``sequence_lengths`` each sequence's own,
    ``budget`` (and each ``LayerReport.budget``) a list with one budget per sequence, and kept indices are
    per sequence in its own positions. ``decoding`` (a :class:`~kvpress_like.decode_compression.DecodingReport`)
    records every decode-time event and the peak cache bytes after the prefill, when the pipeline has a decode
    schedule.
    """

    method: str
    prompt_length: int
    budget: int | list[int]
    layers: dict[int, LayerReport] = field(default_factory=dict)
    uncompressed_layers: list[int] = field(default_factory=list)
    cache_bytes_before: int = 0
    cache_bytes_after: int = 0
    peak_cache_bytes: int = 0
    shared_full_cache: bool = False
    chunk_size: int | None = None
    prompt_chunk: int | None = None
    sequence_lengths: list[int] | None = None
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    decoding: object | None = None  # a DecodingReport (kvpress_like.decode_compression) when decoding compresses

    @property
    def kept_indices(self) -> dict[int, torch.Tensor]:
        return {idx: layer.kept_indices for idx, layer in self.layers.items()}

    @property
    def budget_per_layer(self) -> dict[int, int]:
        return {idx: layer.budget for idx, layer in self.layers.items()}

    @property
    def kept_fraction(self) -> float:
        """Share of the prompt's tokens kept, averaged over the compressed layers' (sequence, KV head) pairs (each
        sequence of a padded batch against its own length): the output of a threshold selector."""
        if not self.layers:
            return 1.0
        lengths = torch.tensor(self.sequence_lengths or [self.prompt_length], dtype=torch.float64)
        shares = [(layer.kept_counts.double() / lengths[:, None]).mean() for layer in self.layers.values()]
        return float(torch.stack(shares).mean())

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
            f"{self.cache_bytes_after / 2**20:.2f} MiB (peak {self.peak_cache_bytes / 2**20:.2f} MiB), "
            f"prefill {self.prefill_seconds:.2f} s + "
            f"compression {self.seconds:.2f} s"
        )
