"""``learned`` — scores predicted from each token's attention input by a fitted surrogate (KVzap, arXiv 2601.07891).

The surrogate (:mod:`kvpress_like.surrogate`) maps the hidden state entering a layer's attention module to
the teacher's log-score of that token, one value per KV head, in the same forward: no window queries and no
extra pass. ``kvpress-like train-scorer`` fits one for any model; the package ships artifacts for its
embedded models. A surrogate fitted on another model is refused (its recorded per-layer fingerprints differ).
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvpress_like.errors import ConfigError
from kvpress_like.hookspecs import hookimpl
from kvpress_like.parts import LayerContext, PartConfig, Scorer
from kvpress_like.surrogate import Surrogate, load_surrogate, shipped_for

SHIPPED = "shipped:"


class LearnedConfig(PartConfig):
    artifact: str = Field(
        ..., description="a folder written by train-scorer, a shipped artifact's name, or 'shipped:<teacher>' for "
        "the shipped artifact distilled from that teacher for the model in use"
    )


class LearnedScorer(Scorer):
    """Score = the surrogate's prediction from the prompt rows' attention inputs ``[batch, kv_heads, L]``."""

    name = "learned"
    summary = "a fitted surrogate's score from each token's attention input (KVzap); train-scorer fits one"
    Config = LearnedConfig
    reads_hidden_states = True

    def __init__(self, config: LearnedConfig | None = None):
        super().__init__(config)
        self._by_layer: dict[int, tuple[int, Surrogate]] = {}  # layer -> (id of its module, surrogate)

    def surrogate_for(self, layer_idx: int, module: torch.nn.Module) -> Surrogate:
        """The artifact that scores this layer, checked against its attention module."""
        memo = self._by_layer.get(layer_idx)
        if memo is not None and memo[0] == id(module):
            return memo[1]
        artifact = self.config.artifact
        if artifact.startswith(SHIPPED):
            surrogate = shipped_for(artifact.removeprefix(SHIPPED), layer_idx, module)
        else:
            surrogate = load_surrogate(artifact)
        self._by_layer[layer_idx] = (id(module), surrogate)
        return surrogate

    def score(self, ctx: LayerContext) -> torch.Tensor:
        hidden = ctx.hidden_states
        if hidden is None or hidden.shape[1] != ctx.prompt_length:
            rows = None if hidden is None else hidden.shape[1]
            raise ConfigError(
                f"the learned scorer needs the attention inputs of all {ctx.prompt_length} candidate rows of layer "
                f"{ctx.layer_idx}, got {rows}: a progressive prefill or a decode-time event does not keep them"
            )
        surrogate = self.surrogate_for(ctx.layer_idx, ctx.module)
        surrogate.check_module(ctx.layer_idx, ctx.module, hidden.shape[-1])
        scores = surrogate.predict(ctx.layer_idx, hidden)
        if scores.shape[1] != ctx.keys.shape[1]:
            raise ConfigError(
                f"the surrogate {surrogate.source} predicts {scores.shape[1]} KV heads for layer {ctx.layer_idx}, "
                f"the model has {ctx.keys.shape[1]}"
            )
        return scores


@hookimpl
def register_scorers():
    return [LearnedScorer]
