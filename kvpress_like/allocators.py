"""Budget allocators: how many prompt tokens each compressed layer keeps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from pydantic import Field

from kvpress_like.errors import ConfigError
from kvpress_like.hookspecs import hookimpl
from kvpress_like.parts import Allocator, PartConfig


class UniformAllocator(Allocator):
    """Every layer and KV head keeps ``min(budget, L)`` tokens (SnapKV, DapQ)."""

    name = "uniform"
    summary = "the same budget for every layer and KV head"

    def layer_budgets(self, num_layers: int, prompt_length: int, budget_tokens: int) -> list[int]:
        return [min(budget_tokens, prompt_length)] * num_layers


class FullAllocator(Allocator):
    """Every layer keeps the whole prompt: no compression (the reference every evaluation compares to)."""

    name = "full"
    summary = "keep every prompt token (no compression; the budget is not used)"
    uses_budget = False

    def layer_budgets(self, num_layers: int, prompt_length: int, budget_tokens: int) -> list[int]:
        return [prompt_length] * num_layers


class PyramidConfig(PartConfig):
    beta: float = Field(20.0, gt=1, description="ratio of the largest to the smallest free budget (PyramidKV β)")
    reserved: int = Field(0, ge=0, description="tokens every layer keeps on top of its pyramid share (the window)")


class PyramidAllocator(Allocator):
    """PyramidKV (Cai et al. 2024): budgets fall linearly from the lowest to the highest layer.

    With ``B`` the uniform budget and ``r`` the reserved tokens, the free share of layer ``i`` goes
    linearly from ``2(B−r) − (B−r)/β`` down to ``(B−r)/β``, so the layers hold ``num_layers × B``
    tokens in all. Shares are rounded with the largest-remainder rule (the total stays exact) and
    capped at the prompt length, the excess going to the layers below the cap.
    """

    name = "pyramid"
    summary = "linearly decreasing per-layer budgets, same total as uniform (PyramidKV)"
    Config = PyramidConfig

    def layer_budgets(self, num_layers: int, prompt_length: int, budget_tokens: int) -> list[int]:
        reserved = min(self.config.reserved, budget_tokens)
        free = budget_tokens - reserved
        if num_layers == 1 or free == 0:
            return [min(budget_tokens, prompt_length)] * num_layers
        low = free / self.config.beta
        high = 2 * free - low
        shares = [reserved + high - (high - low) * i / (num_layers - 1) for i in range(num_layers)]
        return _cap(_round_exact(shares, num_layers * budget_tokens), prompt_length)


def _round_exact(values: list[float], total: int) -> list[int]:
    floors = [math.floor(v) for v in values]
    order = sorted(range(len(values)), key=lambda i: values[i] - floors[i], reverse=True)
    for i in order[: total - sum(floors)]:
        floors[i] += 1
    return floors


def _cap(budgets: list[int], limit: int) -> list[int]:
    """Cap at ``limit``, handing the excess to uncapped layers (largest first) while they have room."""
    budgets = list(budgets)
    excess = sum(max(0, b - limit) for b in budgets)
    budgets = [min(b, limit) for b in budgets]
    for i in sorted(range(len(budgets)), key=lambda i: -budgets[i]):
        room = limit - budgets[i]
        given = min(room, excess)
        budgets[i] += given
        excess -= given
    return budgets


def counts_of_top(ranked: torch.Tensor, k: int) -> torch.Tensor:
    """``[batch, slots]``: how many of each sequence's ``k`` largest entries of ``ranked`` ``[batch, slots, L]``
    fall in each slot (a KV head, or a (layer, head) pair)."""
    batch, slots, length = ranked.shape
    winners = ranked.reshape(batch, slots * length).topk(k, dim=-1).indices // length
    counts = torch.zeros(batch, slots, dtype=torch.long, device=ranked.device)
    return counts.scatter_add_(1, winners, torch.ones_like(winners))


class HeadAdaptiveConfig(PartConfig):
    alpha: float = Field(0.2, ge=0, le=1, description="safeguard: share of the per-head budget every head keeps")


class HeadAdaptiveAllocator(Allocator):
    """Ada-KV (Feng et al. 2024, arXiv 2407.11550): the KV heads of a layer share its budget.

    Every head keeps the selector's protected tokens (e.g. SnapKV's window) and, as a safeguard, its top
    ``⌊α·(B − protected)⌋`` other tokens; the rest of the layer's ``heads × B`` tokens go to the highest
    remaining scores across all heads. Scores must be comparable across heads (softmax attention mass is).
    """

    name = "head_adaptive"
    summary = "per-layer budget shared across KV heads by global top-k, with a safeguard share (Ada-KV)"
    Config = HeadAdaptiveConfig

    def layer_budgets(self, num_layers: int, prompt_length: int, budget_tokens: int) -> list[int]:
        return [min(budget_tokens, prompt_length)] * num_layers

    def safeguard_share(self) -> float:
        """α: the share of the per-head budget (beyond protected tokens) each head keeps by its own ranking."""
        return self.config.alpha

    def head_budgets(self, scores: torch.Tensor, layer_budget: int, protected: torch.Tensor) -> torch.Tensor:
        heads = scores.shape[1]
        ranked = scores.float().masked_fill(protected, float("inf"))
        n_protected = int(protected.sum())
        safeguard = n_protected + math.floor(self.safeguard_share() * (layer_budget - n_protected))
        order = ranked.argsort(dim=-1, descending=True)
        pool = ranked.clone()
        pool.scatter_(-1, order[..., :safeguard], float("-inf"))  # already granted: protected + safeguard
        return (safeguard + counts_of_top(pool, heads * (layer_budget - safeguard))).cpu()


class AcrossHeadsAllocator(HeadAdaptiveAllocator):
    """KVzip's non-uniform budgets (Kim et al. 2025, arXiv 2505.23416): one top-k over all KV heads of a layer
    (registered as ``global``: global across the layer's heads, not across layers).

    The layer keeps ``heads × B`` tokens: every head its protected ones, the rest the best (head, token)
    scores of the whole layer, with no per-head floor (Ada-KV's allocator with α = 0). Layers keep equal
    shares, so each layer is pruned inside the forward as soon as it is scored; KVzip's ranking across
    *layers* is :class:`AcrossLayersAllocator`, which holds the full cache until every layer is scored.
    """

    name = "global"
    summary = "per-layer budget shared across KV heads by one top-k over the layer, no floor (KVzip)"
    Config = PartConfig

    def safeguard_share(self) -> float:
        return 0.0


class AcrossLayersAllocator(UniformAllocator):
    """KVzip's default budgets (Kim et al. 2025, arXiv 2505.23416): one top-k over every KV head of every layer
    (registered as ``global_layers``).

    The model keeps ``Σ layers × heads × B`` tokens: every head its protected ones, the rest the best
    (layer, head, token) scores of the whole model, with no per-head or per-layer floor (kvpress's
    ``KVzipPress`` without ``layerwise``). Scores must be comparable across layers (KVzip's largest attention
    probability is). The ranking needs every layer's scores before any layer is pruned, so a prefill with this
    allocator holds the prompt's full cache until its forward ends (its peak is an uncompressed prefill's
    cache); the progressive prefill and left-padded batches refuse it.
    """

    name = "global_layers"
    summary = ("one top-k over every KV head of every layer, no floor (KVzip's default); holds the full cache while "
               "prefilling")
    model_wide = True

    def model_head_budgets(
        self, scores: dict[int, torch.Tensor], layer_budgets: dict[int, int], protected: dict[int, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        layers = sorted(scores)
        ranked = torch.stack([scores[i].float().masked_fill(protected[i], float("inf")) for i in layers], dim=1)
        batch, n_layers, heads, length = ranked.shape  # [batch, layers, heads, L]
        total = heads * sum(layer_budgets[i] for i in layers)
        counts = counts_of_top(ranked.view(batch, n_layers * heads, length), total).view(batch, n_layers, heads).cpu()
        return {layer: counts[:, n] for n, layer in enumerate(layers)}


class LayerRatiosConfig(PartConfig):
    compression_ratios: tuple[float, ...] = Field(
        ..., min_length=1, description="share of the prompt each compressed layer drops, in layer order (kvpress's "
        "PerLayerCompressionPress convention: 0 keeps everything)"
    )

    def model_post_init(self, __context) -> None:
        bad = [r for r in self.compression_ratios if not 0 <= r < 1]
        if bad:
            raise ValueError(f"compression ratios must lie in [0, 1), got {bad}")


class LayerRatiosAllocator(Allocator):
    """An explicit compression ratio per layer (kvpress's ``PerLayerCompressionPress``): layer ``i`` keeps
    ``⌊L·(1 − r_i)⌋`` tokens, as kvpress's ``ScorerPress`` does with one ratio. The method's budget is not used.
    One ratio per *compressed* layer (sliding-window layers are not counted), else the prefill is refused."""

    name = "layer_ratios"
    summary = "an explicit compression ratio for each layer (kvpress PerLayerCompressionPress); the budget is unused"
    Config = LayerRatiosConfig
    uses_budget = False

    def layer_budgets(self, num_layers: int, prompt_length: int, budget_tokens: int) -> list[int]:
        ratios = self.config.compression_ratios
        if len(ratios) != num_layers:
            raise ConfigError(
                f"layer_ratios has {len(ratios)} compression ratios but the model has {num_layers} compressed layers; "
                f"give exactly {num_layers} (one per full-attention layer, in order)"
            )
        return [int(prompt_length * (1 - ratio)) for ratio in ratios]


class BudgetCurveConfig(PartConfig):
    path: str = Field(..., description="JSON file {'model': str, 'layer_weights': [w_0, …]}: one positive weight per "
                      "compressed layer")


def read_budget_curve(path: str) -> tuple[str, tuple[float, ...]]:
    """``(model, layer weights)`` from a budget-curve file, refusing what is not a usable curve."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"budget curve {path!r} cannot be read as JSON: {error}") from error
    weights = record.get("layer_weights") if isinstance(record, dict) else None
    if not isinstance(weights, list) or not weights or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in weights
    ):
        raise ConfigError(f"budget curve {path!r} needs 'layer_weights': a non-empty list of positive numbers")
    return str(record.get("model", "")), tuple(float(w) for w in weights)


class BudgetCurveAllocator(Allocator):
    """Per-layer budgets from a curve stored in a file (LU-KV style, Baidu-Baige's offline budget curves): layer
    ``i`` gets a share of the model's ``num_layers × B`` tokens proportional to its weight, rounded with the
    largest-remainder rule and capped at ``L`` (the excess going to the layers below the cap). The file names the
    model it was fitted on. Departure from kvpress's ``LUKVPress``: one weight per layer, not per (layer, head).
    """

    name = "budget_curve"
    summary = "per-layer budgets proportional to weights read from a JSON curve file (LU-KV style)"
    Config = BudgetCurveConfig

    def __init__(self, config: PartConfig | None = None):
        super().__init__(config)
        self.model_name, self.weights = read_budget_curve(self.config.path)

    def layer_budgets(self, num_layers: int, prompt_length: int, budget_tokens: int) -> list[int]:
        if len(self.weights) != num_layers:
            raise ConfigError(
                f"budget curve {self.config.path!r} (fitted on {self.model_name or 'an unnamed model'}) has "
                f"{len(self.weights)} layer weights but the model has {num_layers} compressed layers"
            )
        total = sum(self.weights)
        shares = [num_layers * budget_tokens * w / total for w in self.weights]
        return _cap(_round_exact(shares, num_layers * budget_tokens), prompt_length)


@hookimpl
def register_allocators():
    return [
        UniformAllocator, FullAllocator, PyramidAllocator, HeadAdaptiveAllocator, AcrossHeadsAllocator,
        AcrossLayersAllocator,
        LayerRatiosAllocator, BudgetCurveAllocator,
    ]
