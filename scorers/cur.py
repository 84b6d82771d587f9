"""The ``cur`` scorer: CUR-style leverage of keys and values, normalised in local windows (CurDKV).

After CurDKV (Sengupta et al. 2025, "Value-Guided KV Compression for LLMs via Approximated CUR Decomposition",
arXiv 2509.15038) as kvpress's ``CURPress`` implements it: a token's key leverage is approximated by ``‖k‖²`` and
its value leverage by ``‖v‖²``; each is normalised within consecutive windows of ``window`` tokens (the local
approximation), and they are combined (``kv_product`` by default) and normalised over the prompt. Attention-free.

Departures from kvpress: the first tokens are protected by the selector (the method's ``sinks``) instead of
being given the score 1; the random-projection variant (``use_random_leverage``, an unseeded sketch) is not
offered, so the same prompt always keeps the same tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvpress_like.hookspecs import hookimpl
from kvpress_like.parts import LayerContext, PartConfig, Scorer


class CURConfig(PartConfig):
    combine: Literal["kv_product", "kv_avg", "key", "value"] = Field(
        "kv_product", description="how key and value leverage are combined (CurDKV: the product)"
    )
    window: int = Field(16, ge=2, description="tokens per local normalisation window (a window ≥ L normalises over "
                        "the whole prompt)")


def window_normalised(energy: torch.Tensor, window: int) -> torch.Tensor:
    """``energy`` ``[..., L]`` divided by its sum over each consecutive window of ``window`` tokens."""
    length = energy.shape[-1]
    padded = torch.nn.functional.pad(energy, (0, -length % window))
    blocks = padded.unflatten(-1, (-1, window))
    return (blocks / blocks.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(energy.dtype).tiny)).flatten(-2)[
        ..., :length
    ]


class CURScorer(Scorer):
    """Local-window-normalised ``‖k‖²`` and ``‖v‖²`` leverage, combined and normalised over the prompt."""

    name = "cur"
    summary = "approximate CUR leverage ‖k‖²·‖v‖², normalised in local windows (CurDKV)"
    Config = CURConfig

    def score(self, ctx: LayerContext) -> torch.Tensor:
        length = ctx.prompt_length
        key_energy = window_normalised(ctx.keys[:, :, :length].float().square().sum(-1), self.config.window)
        value_energy = window_normalised(ctx.values[:, :, :length].float().square().sum(-1), self.config.window)
        combined = {
            "kv_product": lambda: key_energy * value_energy,
            "kv_avg": lambda: (key_energy + value_energy) / 2,
            "key": lambda: key_energy,
            "value": lambda: value_energy,
        }[self.config.combine]()
        return combined / combined.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(combined.dtype).tiny)


@hookimpl
def register_scorers():
    return [CURScorer]
