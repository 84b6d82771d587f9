"""The ``key_diff`` scorer: keys unlike the layer's average key are kept (KeyDiff).

Park et al. 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments" (arXiv 2504.15364). The anchor is the mean of the L2-normalised prompt keys
of each KV head; a key's score is its negative cosine similarity to that anchor, so the most distinctive keys
stay. Attention-free: no queries are read. As in kvpress's ``KeyDiffPress``, the scores are computed once on the
prompt's post-RoPE keys; the paper evicts block by block while prefilling (our progressive prefill is that
variant: each round's anchor is that of the rows it holds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvpress_like.hookspecs import hookimpl
from kvpress_like.parts import LayerContext, Scorer


class KeyDiffScorer(Scorer):
    """Score = −cos(k, mean of the normalised keys), per KV head."""

    name = "key_diff"
    summary = "negative cosine similarity of each key to the mean normalised key (KeyDiff)"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        keys = ctx.keys[:, :, : ctx.prompt_length].float()
        anchor = F.normalize(keys, dim=-1).mean(dim=2, keepdim=True)
        return -F.cosine_similarity(keys, anchor, dim=-1)


@hookimpl
def register_scorers():
    return [KeyDiffScorer]
