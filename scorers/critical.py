"""The ``critical`` scorer: attention re-weighted by how much each value moves the layer's output.

CriticalKV, Feng et al. 2025 ("Identify Critical KV Cache in LLM Inference from an Output Perturbation
Perspective"). Score = attention × ‖W_o^h v‖₁ (the value projected by the head's slice of the output
projection), averaged over each KV group. The paper's two-stage selection (part of the budget by plain
attention first) is the ``critical`` selector's job: this scorer hands it plain attention as the
first-stage score, in the imaginary part of complex scores (see :class:`kvpress_like.parts.Scorer`).
"""

from __future__ import annotations

import torch

from kvpress_like.hookspecs import hookimpl
from kvpress_like.parts import LayerContext, Scorer
from kvpress_like.scorers.attention import AttentionConfig, attention_scores

ROWS_AT_A_TIME = 1024  # values projected per step: the work tensor is O(rows × hidden), never O(L × hidden)


def projected_value_norm(ctx: LayerContext) -> torch.Tensor:
    """``[batch, kv_heads, L]``: mean over each group's query heads of ‖W_o^h v_j‖₁."""
    values = ctx.values[:, :, : ctx.prompt_length].float()
    kv_heads, head_dim = values.shape[1], values.shape[3]
    weight = ctx.module.o_proj.weight.float()  # [hidden, q_heads * head_dim]
    q_heads = weight.shape[1] // head_dim
    group = q_heads // kv_heads
    per_head = weight.T.reshape(kv_heads, group, head_dim, -1)  # [kv, g, d, hidden]
    norms = [
        torch.einsum("bkld,kgdh->bkglh", values[:, :, start : start + ROWS_AT_A_TIME], per_head).abs().sum(-1)
        for start in range(0, values.shape[2], ROWS_AT_A_TIME)
    ]
    return torch.cat(norms, dim=-1).mean(dim=2) if norms else values.new_zeros(*values.shape[:2], 0)


class CriticalScorer(Scorer):
    """Attention × projected value norm (real part), with plain attention as the first-stage score (imaginary part)."""

    name = "critical"
    summary = "attention × ‖W_o v‖₁, plain attention as first-stage score (CriticalKV)"
    Config = AttentionConfig

    def score(self, ctx: LayerContext) -> torch.Tensor:
        attention = attention_scores(ctx, self.config)
        return torch.complex(attention * projected_value_norm(ctx), attention)


@hookimpl
def register_scorers():
    return [CriticalScorer]
