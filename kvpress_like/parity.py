"""Every kvpress press beside what kvpress_like offers for it: the records behind ``docs/kvpress-parity.md``.

One :class:`PressParity` per press of kvpress's ``kvpress/presses/`` (main at 8bb29b9, plus KVgradPress and
DropKVPress merged or proposed after it). A press is either *covered* by a ``build(...)`` call (a registered
method, or a method with some parts swapped), with what differs and why, or *not covered*, with the reason
and the closest alternative (itself a ``build(...)`` call where one exists). ``tests/test_kvpress_parity.py``
builds every call, runs it on a tiny model and checks the page is this module's rendering; agreement with
kvpress itself comes from the record ``docs/results/kvpress-parity/agreement.json`` when it exists
(``scripts/kvpress_parity.py`` writes it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Call:
    """``build(method, budget, decoding, **overrides)`` and the ``prefill`` arguments the call needs."""

    method: str
    budget: Any = 0.5
    overrides: dict[str, Any] = field(default_factory=dict)
    decoding: dict[str, Any] | None = None
    prefill: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        args = [repr(self.method)]
        if self.budget is not None:
            args.append(f"budget={self.budget!r}")
        if self.decoding is not None:
            args.append(f"decoding={self.decoding!r}")
        args += [f"{key}={value!r}" for key, value in self.overrides.items()]
        text = f"build({', '.join(args)})"
        if self.prefill:
            text += ".prefill(…, " + ", ".join(f"{k}={v!r}" for k, v in self.prefill.items()) + ")"
        return text


@dataclass(frozen=True)
class PressParity:
    press: str
    call: Call | None  # None: not covered
    notes: str  # covered: what differs and why; not covered: the reason
    alternative: Call | None = None  # not covered: the closest build(...)


PRESSES: tuple[PressParity, ...] = (
    PressParity("BasePress / ScorerPress", None,
                "infrastructure, not a method: our engine's per-layer step (window → scorer → allocator → selector) "
                "plays that part, on every backend, and frees memory physically"),
    PressParity("RandomPress", Call("random"), "seeded per layer (seed + layer index); kvpress draws from the "
                "global generator unless seeded"),
    PressParity("KnormPress", Call("knorm"), "same score (−‖k‖)"),
    PressParity("SnapKVPress", Call("snapkv", overrides={"window": {"size": 64}, "scorer": {"kernel": 5},
                                                          "selector": {"recent": 64}}),
                "our snapkv defaults to the paper's window 32 and kernel 7; the overrides give kvpress's 64 and 5. "
                "Queries are the layer's own (tapped), not recomputed"),
    PressParity("PyramidKVPress", Call("pyramidkv"), "PyramidKV's linear budgets (β = 20) with an exact total; "
                "kvpress falls back to SnapKV when the pyramid is infeasible, ours caps layers at L"),
    PressParity("TOVAPress", Call("tova"), "same: last-token attention averaged over all heads, one set per layer"),
    PressParity("ObservedAttentionPress", Call("observed_attention"),
                "attention recomputed in query chunks, so any backend works (kvpress needs eager + output_attentions)"),
    PressParity("StreamingLLMPress", Call("streaming_llm"), "4 sinks + recent tokens; no key re-rotation (see "
                "KeyRerotationPress)"),
    PressParity("ExpectedAttentionPress", Call("expected_attention"),
                "kvpress's registry preset wraps it in AdaKV: add allocator='head_adaptive'"),
    PressParity("ExpectedAttentionStatsPress", None,
                "needs query statistics precomputed offline and downloaded from the Hub; nothing here downloads",
                Call("expected_attention")),
    PressParity("CriticalKVPress / CriticalAdaKVPress", Call("critical_snapkv"),
                "two stages as kvpress (50 % by the base score, then ×‖W_o v‖₁); Ada variant: "
                "allocator='head_adaptive'"),
    PressParity("AdaKVPress", Call("ada_snapkv"), "real per-head budgets (ragged cache, memory freed) instead of "
                "masking with fake keys; any method takes allocator='head_adaptive'"),
    PressParity("KVzipPress", Call("kvzip"), "see the KVzip side-by-side (scripts/kvpress_reference.py)"),
    PressParity("FastKVzipPress", None, "a trained per-layer gate with Hub weights", Call("kvzip")),
    PressParity("KVzapPress", Call("kvzap"),
                "surrogates trained here (linear or MLP, `kvpress-like train-scorer`) on offline text against KVzip's "
                "score, not KVzip+; shipped for the embedded models, none downloaded (kvpress: nvidia/KVzap-* Hub "
                "weights); ranked across heads and layers"),
    PressParity("DMSPress", Call("kvzap_dms", budget=None),
                "threshold eviction outside 4 sinks and a 128-token recent window; any scorer takes "
                "selector='threshold' with allocator='full'; prefill only (kvpress also evicts while decoding)"),
    PressParity("QFilterPress", None, "filters come from an offline SVD of the model's queries (Hub weights); no "
                "local artifact builder yet", Call("keydiff")),
    PressParity("LagKVPress", Call("lagkv"), "same scores (ranks per partition of 128, sinks and tail scored 1)"),
    PressParity("KeyDiffPress", Call("keydiff"), "same score (−cos(k, mean normalised key))"),
    PressParity("LeverageScorePress", None,
                "needs pre-RoPE keys, i.e. each cached row's position, which LayerContext does not carry (held rows "
                "of progressive and decode-time events are not at their row index)", Call("cur")),
    PressParity("NonCausalAttnPress", Call("non_causal_attention"),
                "z-score per sequence instead of over the batch (rankings unchanged)"),
    PressParity("CompactorPress", None, "blends leverage (not covered, see LeverageScorePress) with non-causal "
                "attention; its default blending is the compression ratio, which a scorer never sees here",
                Call("non_causal_attention")),
    PressParity("CURPress", Call("cur"), "sinks protected by the selector instead of scored 1; no unseeded "
                "random-projection variant"),
    PressParity("CapPress", Call("cap"), "sink score max + 1 per sequence instead of over the batch"),
    PressParity("ThinKPress", None, "prunes key channels, a new axis for the cache (kvpress zeroes them: no memory "
                "saved)", Call("snapkv")),
    PressParity("SimLayerKVPress", None, "a layer's budget depends on its own attention (lazy layers); our "
                "allocators fix layer budgets before scoring", Call("pyramidkv")),
    PressParity("DuoAttentionPress", None, "retrieval/streaming heads from a calibration artifact not built here",
                Call("ada_snapkv")),
    PressParity("FinchPress", None, "needs key re-rotation and score normalisation; the question window is here",
                Call("snapkv", overrides={"window": "question", "selector": {"recent": 0}},
                     prefill={"question_span": "(start, end)"})),
    PressParity("KVComposePress", None, "composite tokens (structured cross-head alignment) are not a part here",
                Call("ada_snapkv")),
    PressParity("RestoreKVPress", None, "learned restore tokens + LoRA (Hub weights)", Call("kvzip")),
    PressParity("KVgradPress", None, "needs a backward pass", Call("kvzip")),
    PressParity("DropKVPress", None, "open PR #285; its exact formula is not settled upstream", Call("snapkv")),
    PressParity("ChunkPress", Call("knorm", overrides={"selector": {"name": "segments", "segment_size": 1024}}),
                "one scoring of the whole prompt, then the same share of every 1024-token segment (kvpress scores "
                "each chunk on its own); shares rounded to the exact budget"),
    PressParity("ChunkKVPress", Call("snapkv_chunk"), "whole 16-token chunks by mean score (kvpress: 20)"),
    PressParity("BlockPress", Call("snapkv", prefill={"prompt_chunk": 128}),
                "a real progressive prefill: the cache never holds more than budget + one chunk (kvpress runs one "
                "full forward, then rescores block by block)"),
    PressParity("KeyRerotationPress", None, "no post-selection transform step in the part chain yet",
                Call("streaming_llm")),
    PressParity("PerLayerCompressionPress",
                Call("snapkv", budget=None, overrides={"allocator": {"name": "layer_ratios",
                                                                     "compression_ratios": [0.5, 0.25]}}),
                "one ratio per compressed layer (a list of the wrong length is refused); works on every backend"),
    PressParity("LUKVPress", Call("expected_attention", overrides={"allocator": {"name": "budget_curve",
                                                                                 "path": "curve.json"}}),
                "one weight per layer from a local JSON curve (LU-KV's curves are per layer × head, on the Hub)"),
    PressParity("ComposedPress", None, "no composition of two methods yet", Call("critical_snapkv")),
    PressParity("MergingPress", None, "no merge-on-evict step yet", Call("snapkv")),
    PressParity("DecodingPress", Call("snapkv", budget=1.0, decoding={"interval": 512, "target": 2048}),
                "budget 1.0 leaves the prefill whole; the cache is cut back to the target every interval steps, "
                "memory freed, positions kept"),
    PressParity("CompressionRatioDecodingPress", Call("snapkv", budget=1.0, decoding={"interval": 512,
                                                                                       "ratio": 0.5}),
                "same schedule with a ratio of the tokens seen"),
    PressParity("PrefillDecodingPress", Call("snapkv", budget=0.5, decoding={"interval": 512, "ratio": 0.5}),
                "one method for both phases (kvpress allows a different press per phase)"),
    PressParity("CAMPress", None, "decode-time merging of evicted values", Call("h2o")),
    PressParity("FilteringPress / UniformFilteringPress", None, "closed upstream; keep/skip of each new token is "
                "not a schedule here", Call("snapkv", budget=1.0, decoding={"interval": 64, "target": 512})),
    PressParity("TurboQuantPress", None, "quantization (closed upstream; no memory saved there)", None),
)

INTRO = """# kvpress parity

Every press of NVIDIA kvpress (`kvpress/presses/` at main 8bb29b9, plus KVgradPress and DropKVPress from later
pull requests) beside what kvpress_like offers for it: the `build(...)` call that runs it here and what differs,
or why it is not covered and the closest call. Generated by `tests/test_kvpress_parity.py`
(`KVPRESS_LIKE_WRITE_DOCS=1 pytest tests/test_kvpress_parity.py` rewrites it) from `kvpress_like.parity`; the test
builds every call shown and compresses a prompt with it. A budget is the share of the prompt kept: kvpress's
`compression_ratio=r` is `budget=1 - r`. The agreement column is filled only from a side-by-side record
(`docs/results/kvpress-parity/agreement.json`); a dash means no such measurement has been made.

"""

AGREEMENT_RECORD = Path(__file__).resolve().parents[1] / "docs" / "results" / "kvpress-parity" / "agreement.json"


def agreement(path: Path = AGREEMENT_RECORD) -> dict[str, dict[str, Any]]:
    """Per press, the side-by-side record's figures (empty when no record has been written)."""
    return json.loads(path.read_text())["presses"] if path.is_file() else {}


def render_markdown(figures: dict[str, dict[str, Any]] | None = None) -> str:
    """The parity table: press, our call (or the reason and the closest alternative), agreement with kvpress."""
    figures = agreement() if figures is None else figures
    rows = ["| kvpress press | ours | what differs and why | kept-set Jaccard vs kvpress |",
            "| --- | --- | --- | --- |"]
    for entry in PRESSES:
        if entry.call is not None:
            ours, notes = f"`{entry.call.render()}`", entry.notes
        else:
            ours = "not covered"
            closest = f"; closest: `{entry.alternative.render()}`" if entry.alternative else ""
            notes = f"{entry.notes}{closest}"
        figure = figures.get(entry.press)
        measured = f"{figure['mean_jaccard']:.3f} (min {figure['min_jaccard']:.3f})" if figure else "—"
        rows.append(f"| {entry.press} | {ours} | {notes} | {measured} |")
    covered = sum(entry.call is not None for entry in PRESSES)
    return "\n".join(rows) + f"\n\n{covered} of {len(PRESSES)} rows covered by a `build(...)` call.\n"


def render_page() -> str:
    """``docs/kvpress-parity.md``: the introduction and the table."""
    return INTRO + render_markdown()
