"""The ``expected_attention`` scorer: attention that *future* queries are expected to pay each key.

After kvpress's Expected Attention (Devoto et al. 2025, "Expected Attention: KV Cache Compression by
Estimating Attention from Future Queries Distribution"). Pre-RoPE queries of the prompt are summarised
by their mean μ and covariance Σ per head; the RoPE rotation averaged over the next ``n_future``
positions, R̄, moves them to the future: μ' = R̄μ, Σ' = R̄ΣR̄ᵀ. For a Gaussian query,
E[exp(q·k/√d)] = exp(μ'·k/√d + kᵀΣ'k/2d), normalised over keys, averaged over each KV group and
(optionally) multiplied by ‖v‖. Statistics come from the prompt's rows, skipping the first ``n_sink``
tokens (all of them if the prompt has no more), as running sums: a progressive prefill adds each chunk's
rows and scores what it holds with the statistics of the prompt so far (its last round: of the whole
prompt, exactly as a one-pass prefill).
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvpress_like.adapters import project_queries
from kvpress_like.hookspecs import hookimpl
from kvpress_like.parts import LayerContext, PartConfig, Scorer

ROWS_PER_STEP = 4096  # prompt rows projected to queries at a time for the statistics


class ExpectedAttentionConfig(PartConfig):
    n_future: int = Field(512, ge=1, description="future positions whose RoPE rotations are averaged")
    n_sink: int = Field(4, ge=0, description="first tokens left out of the query statistics")
    use_covariance: bool = Field(True, description="include the kᵀΣk/2d term")
    use_vnorm: bool = Field(True, description="multiply by the value norm")
    epsilon: float = Field(0.0, ge=0, description="added to the probabilities before the value norm")


def averaged_rotation(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The ``[head_dim, head_dim]`` mean of the RoPE rotation matrices whose ``cos``/``sin`` are ``[n, rot]``."""
    rot = cos.shape[-1]
    half = rot // 2
    mean_cos, mean_sin = cos.float().mean(0), sin.float().mean(0)
    # rotate_half(x) = P x with P = [[0, -I], [I, 0]] on the rotated dimensions
    swap = torch.zeros(rot, rot, device=cos.device)
    swap[:half, half:] = -torch.eye(half, device=cos.device)
    swap[half:, :half] = torch.eye(half, device=cos.device)
    rotation = torch.eye(head_dim, device=cos.device)
    rotation[:rot, :rot] = torch.diag(mean_cos) + torch.diag(mean_sin) @ swap
    return rotation


class QueryMoments:
    """Running count, sum and sum of outer products of query rows ``[batch, heads, rows, d]`` (float64)."""

    def __init__(self):
        self.count, self.total, self.outer = 0, None, None

    def add(self, queries: torch.Tensor) -> None:
        if not queries.shape[2]:
            return
        queries = queries.double()
        total, outer = queries.sum(dim=2), queries.transpose(-1, -2) @ queries
        self.count += queries.shape[2]
        self.total = total if self.total is None else self.total + total
        self.outer = outer if self.outer is None else self.outer + outer

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        return mean.float(), (self.outer / self.count - mean[..., :, None] * mean[..., None, :]).float()


class ExpectedAttentionScorer(Scorer):
    """Closed-form expected attention of future queries (Gaussian query statistics, averaged RoPE)."""

    name = "expected_attention"
    summary = "expected softmax attention of future queries from prompt query statistics (× value norm)"
    Config = ExpectedAttentionConfig
    reads_hidden_states = True
    accumulates_hidden_states = True

    def score(self, ctx: LayerContext) -> torch.Tensor:
        cfg = self.config
        mean, cov = self._statistics(ctx)
        positions = torch.arange(ctx.next_position, ctx.next_position + cfg.n_future, device=ctx.keys.device)
        cos, sin = ctx.rope_at(positions)
        rotation = averaged_rotation(cos[0], sin[0], mean.shape[-1])
        mean = mean @ rotation.T
        cov = rotation @ cov @ rotation.T

        length = ctx.prompt_length
        batch, kv_heads = ctx.keys.shape[:2]
        group = mean.shape[1] // kv_heads
        keys = ctx.keys[:, :, :length].float().repeat_interleave(group, dim=1)  # [b, Hq, L, d]
        logits = (keys @ mean[..., None]).squeeze(-1) * ctx.scaling
        if cfg.use_covariance:
            logits = logits + 0.5 * ctx.scaling**2 * ((keys @ cov) * keys).sum(-1)
        probs = logits.softmax(dim=-1).reshape(batch, kv_heads, group, length).mean(dim=2)
        if cfg.use_vnorm:
            probs = (probs + cfg.epsilon) * ctx.values[:, :, :length].float().norm(dim=-1)
        return probs

    def _statistics(self, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``[b, Hq, d]`` and covariance ``[b, Hq, d, d]`` of the pre-RoPE queries of the prompt so far,
        the first ``n_sink`` tokens left out (unless nothing else has been seen)."""
        sinks, rest = ctx.state.setdefault("moments", (QueryMoments(), QueryMoments()))
        hidden, first = ctx.hidden_states, ctx.hidden_start
        end = first + hidden.shape[1]
        for lo in range(first, end, ROWS_PER_STEP):
            hi = min(lo + ROWS_PER_STEP, end)
            split = min(max(self.config.n_sink, lo), hi)  # rows before it are sinks
            queries = project_queries(ctx.module, hidden[:, lo - first : hi - first])
            sinks.add(queries[:, :, : split - lo])
            rest.add(queries[:, :, split - lo :])
        if rest.count:  # sinks come first and are never used again: drop their sums
            ctx.state["moments"] = (QueryMoments(), rest)
            return rest.mean_and_covariance()
        return sinks.mean_and_covariance()


@hookimpl
def register_scorers():
    return [ExpectedAttentionScorer]
