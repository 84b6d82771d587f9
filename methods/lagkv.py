"""``lagkv`` — lag-relative key/value statistics, partition by partition; sinks and the tail kept first.

Liang et al. 2025, "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important"
(arXiv 2504.04704); kvpress's ``LagKVPress`` (4 sinks, partitions of 128, per-partition ranks).
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods_spec import MethodSpec, PartChoice

LAGKV = MethodSpec(
    name="lagkv",
    summary="min-max-normalised std of keys and values relative to the next partition (attention-free)",
    paper="Liang et al. 2025, arXiv 2504.04704",
    departures="scores the whole prompt once (the paper compresses partition by partition as the cache grows; "
    "prompt_chunk=… is that variant)",
    window=PartChoice(name="none"),
    scorer=PartChoice(name="lag_kv"),
)


@hookimpl
def register_methods():
    return [LAGKV]
