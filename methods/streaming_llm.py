"""``streaming_llm`` — attention sinks plus the most recent tokens.

Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks". The first 4 tokens are
protected, the rest of the budget goes to the most recent ones. Applied once at prefill (the paper keeps
the window rolling during decoding; here the cache grows normally after compression).
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods_spec import MethodSpec, PartChoice

STREAMING_LLM = MethodSpec(
    name="streaming_llm",
    summary="4 attention sinks + the most recent tokens",
    paper="Xiao et al. 2023, arXiv 2309.17453",
    departures="compresses once at prefill instead of rolling the window during decoding",
    window=PartChoice(name="none"),
    scorer=PartChoice(name="recency"),
    selector=PartChoice(name="topk", options={"sinks": 4}),
)


@hookimpl
def register_methods():
    return [STREAMING_LLM]
