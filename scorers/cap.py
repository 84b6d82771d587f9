"""The ``cap`` scorer: query-weighted log-det capacity of the values (CapKV, kvpress's ``CapPress``).

After "CAPKV" (arXiv 2604.25975) as kvpress's ``CapPress`` computes it. A query anchor μ is the mean of the
prompt's pre-RoPE queries (the first ``n_sink`` tokens left out), rotated by the RoPE rotation averaged over
the next ``n_future`` positions (as in Expected Attention; the statistics are the ``expected_attention``
scorer's, so a progressive prefill accumulates them chunk by chunk). Each key gets a weight
``w_i = exp(τ·cos(k_i, μ) − max)``; with ``A = I + Σ_i w_i v_i v_iᵀ`` its score is ``w_i · v_iᵀ A⁻¹ v_i`` (the
value's share of the log-det capacity), averaged over the KV group. The first ``n_sink`` tokens score above
every other token (kvpress pads them with the maximum + 1). Departures from the paper, all kvpress's: keys and
anchor are L2-normalised (cosine instead of dot product), a per-head max shift before the exponential, the
averaged future RoPE, and ``u_i = v_i``. Ours: in a progressive round the sinks are the first rows held.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from kvpress_like.hookspecs import hookimpl
from kvpress_like.parts import LayerContext, PartConfig, Scorer
from kvpress_like.scorers.expected_attention import ExpectedAttentionScorer, averaged_rotation


class CapConfig(PartConfig):
    tau: float = Field(5.0, gt=0, description="temperature of the query-key alignment weights")
    n_future: int = Field(512, ge=1, description="future positions whose RoPE rotations are averaged")
    n_sink: int = Field(4, ge=0, description="first tokens left out of the statistics and scored highest")
    epsilon: float = Field(1e-6, ge=0, description="added to the weights under the square root")


class CapScorer(Scorer):
    """``w_i · v_iᵀ (I + Σ w v vᵀ)⁻¹ v_i`` with ``w_i = exp(τ·cos(k_i, R̄μ_q))``, GQA mean; sinks first."""

    name = "cap"
    summary = "query-weighted value capacity w·vᵀA⁻¹v, w = exp(τ·cos(k, rotated query mean)) (CapKV)"
    Config = CapConfig
    reads_hidden_states = True
    accumulates_hidden_states = True

    def score(self, ctx: LayerContext) -> torch.Tensor:
        cfg = self.config
        statistics = ExpectedAttentionScorer(ExpectedAttentionScorer.Config(n_sink=cfg.n_sink, n_future=cfg.n_future))
        mean, _ = statistics._statistics(ctx)  # [B, H_q, d], pre-RoPE
        positions = torch.arange(ctx.next_position, ctx.next_position + cfg.n_future, device=ctx.keys.device)
        cos, sin = ctx.rope_at(positions)
        anchor = F.normalize(mean @ averaged_rotation(cos[0], sin[0], mean.shape[-1]).T, dim=-1)

        length, group = ctx.prompt_length, ctx.num_kv_groups
        sinks = min(cfg.n_sink, length)
        keys = ctx.keys[:, :, sinks:length].float().repeat_interleave(group, dim=1)  # [B, H_q, n, d]
        values = ctx.values[:, :, sinks:length].float().repeat_interleave(group, dim=1)
        logits = cfg.tau * (F.normalize(keys, dim=-1) @ anchor[..., None]).squeeze(-1).clamp(-1.0, 1.0)
        weights = (logits - logits.amax(dim=-1, keepdim=True)).exp()
        scaled = values * (weights + cfg.epsilon).sqrt()[..., None]
        capacity = torch.eye(values.shape[-1], device=values.device) + scaled.transpose(-1, -2) @ scaled
        solution = torch.linalg.solve(capacity, values.transpose(-1, -2))  # [B, H_q, d, n]
        scores = weights * (values.transpose(-1, -2) * solution).sum(dim=-2)
        batch, q_heads, n = scores.shape
        scores = scores.view(batch, q_heads // group, group, n).mean(dim=2)
        top = scores.amax(dim=(1, 2), keepdim=True) + 1 if n else torch.ones(batch, 1, 1, device=scores.device)
        return torch.cat([top.expand(-1, scores.shape[1], sinks), scores], dim=-1)


@hookimpl
def register_scorers():
    return [CapScorer]
