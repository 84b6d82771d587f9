"""``keydiff`` — keep the keys least similar to the layer's average key.

Park et al. 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments" (arXiv 2504.15364); kvpress's ``KeyDiffPress``.
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods_spec import MethodSpec, PartChoice

KEYDIFF = MethodSpec(
    name="keydiff",
    summary="keys with the lowest cosine similarity to the mean normalised key are kept",
    paper="Park et al. 2025, arXiv 2504.15364",
    departures="scores the whole prompt once (the paper evicts block by block while prefilling; "
    "prompt_chunk=… is that variant)",
    window=PartChoice(name="none"),
    scorer=PartChoice(name="key_diff"),
)


@hookimpl
def register_methods():
    return [KEYDIFF]
