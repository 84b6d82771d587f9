"""The ``critical`` scorer: attention re-weighted by how much each value moves the layer's output.

CriticalKV, Feng et al. 2025 ("Identify Critical KV Cache in LLM Inference from an Output Perturbation
Perspective"). Score = attention × ‖W_o^h v‖₁ (the value projected by the head's slice of the output
projection), averaged over each KV group; two-stage selection: the top ``first_stage_ratio`` × budget
tokens by plain attention are taken first, the rest by the re-weighted score.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvpress_like.hookspecs import hookimpl
from kvpress_like.parts import LayerContext, Scorer
from kvpress_like.scorers.attention import AttentionConfig, attention_scores


class CriticalConfig(AttentionConfig):
    first_stage_ratio: float = Field(0.5, ge=0, le=1, description="share of the budget chosen by attention alone")


def projected_value_norm(ctx: LayerContext) -> torch.Tensor:
    """``[batch, kv_heads, L]``: mean over each group's query heads of ‖W_o^h v_j‖₁."""
    values = ctx.values[:, :, : ctx.prompt_length].float()
    kv_heads, head_dim = values.shape[1], values.shape[3]
    weight = ctx.module.o_proj.weight.float()  # [hidden, q_heads * head_dim]
    q_heads = weight.shape[1] // head_dim
    group = q_heads // kv_heads
    per_head = weight.T.reshape(kv_heads, group, head_dim, -1)  # [kv, g, d, hidden]
    projected = torch.einsum("bkld,kgdh->bkglh", values, per_head)
    return projected.abs().sum(-1).mean(dim=2)


class CriticalScorer(Scorer):
    """Attention scores × projected value norm, with a first stage chosen by attention alone."""

    name = "critical"
    summary = "attention × ‖W_o v‖₁ with a two-stage selection (CriticalKV)"
    Config = CriticalConfig
    reads_budget = True

    def score(self, ctx: LayerContext) -> torch.Tensor:
        attention = attention_scores(ctx, self.config)
        weighted = attention * projected_value_norm(ctx)
        first = round(self.config.first_stage_ratio * ctx.budget)
        if first == 0:
            return weighted
        chosen = attention.topk(min(first, attention.shape[-1]), dim=-1).indices
        boost = weighted.amax(dim=-1, keepdim=True) + 1  # finite: protected tokens (+inf) still rank first
        return weighted.scatter(-1, chosen, boost.expand_as(chosen) + attention.gather(-1, chosen))


@hookimpl
def register_scorers():
    return [CriticalScorer]
