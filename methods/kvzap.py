"""``kvzap`` / ``kvzap_dms`` — KVzip's judgement from a learned surrogate; ``dapq_distilled`` — DapQ's, the same way.

KVzap (arXiv 2601.07891) replaces KVzip's reconstruction pass (Kim et al. 2025, arXiv 2505.23416) by a
per-layer regression from each token's attention input to the log of its KVzip score, so the cost is one
matmul per layer in the prefill's own forward. ``kvzap`` ranks those scores as KVzip does here (``kvzip_layers``:
the heads and layers share one budget, ``global_layers``, with 4 sinks); ``kvzap_dms`` drops instead every token
scored below a threshold once it is outside a 128-token recent window (DMS semantics, Łańcucki et al. 2025,
arXiv 2506.05345), so the kept share is an output. ``dapq_distilled`` is ours: a surrogate distilled from
``dapq`` (Tian et al. 2026, arXiv 2603.11564) with DapQ's uniform budgets, so DapQ's judgement without its
pseudo-query rows.

The surrogates are the artifacts shipped for the embedded models (``kvpress_like/surrogates/``), chosen by the
model's fingerprint; for another model, ``kvpress-like train-scorer MODEL --teacher kvzip --out DIR`` fits one
and ``build("kvzap", budget=..., scorer={"artifact": DIR})`` uses it. Departures from KVzap: the teacher is
KVzip's own score (max attention over the reconstruction queries and the GQA group), not KVzip+ (which also
divides by the query row's hidden-state norm and multiplies by ‖W_O v‖); the training text is offline (the
standard library's docstrings and generated facts, see :mod:`kvpress_like.train_corpus`), not Nemotron.
"""

from __future__ import annotations

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods_spec import MethodSpec, PartChoice

KVZAP = MethodSpec(
    name="kvzap",
    summary="a learned surrogate of KVzip's scores from each token's attention input, ranked across heads and layers",
    paper="arXiv 2601.07891 (KVzap), after Kim et al. 2025, arXiv 2505.23416 (KVzip)",
    departures="teacher is KVzip's score, not KVzip+; offline training text; see the module docstring",
    window=PartChoice(name="none"),
    scorer=PartChoice(name="learned", options={"artifact": "shipped:kvzip"}),
    allocator=PartChoice(name="global_layers"),
    selector=PartChoice(name="topk", options={"sinks": 4}),
)

KVZAP_DMS = KVZAP.variant(
    "kvzap_dms",
    "the KVzip surrogate's scores with threshold eviction outside a 128-token recent window (kept share is an output)",
    "arXiv 2601.07891 (KVzap), Łańcucki et al. 2025, arXiv 2506.05345 (DMS)",
    departures="as kvzap; no budget: pass selector={'threshold': τ} (log-score units) to move along the curve",
    allocator=PartChoice(name="full"),
    selector=PartChoice(name="threshold", options={"threshold": -6.0, "sinks": 4, "recent": 128}),
)

DAPQ_DISTILLED = MethodSpec(
    name="dapq_distilled",
    summary="a learned surrogate of DapQ's scores from each token's attention input: no pseudo-query rows",
    paper="ours, after Tian et al. 2026, arXiv 2603.11564 (DapQ) and arXiv 2601.07891 (KVzap)",
    departures="the surrogate sees each token's own hidden state only, so it cannot read a question that comes later",
    window=PartChoice(name="none"),
    scorer=PartChoice(name="learned", options={"artifact": "shipped:dapq"}),
)


@hookimpl
def register_methods():
    return [KVZAP, KVZAP_DMS, DAPQ_DISTILLED]
