"""docs/kvpress-parity.md is the rendering of kvpress_like.parity, and every build(...) call it shows builds and
compresses a prompt of a tiny model."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import random_ids, tiny_model

from kvpress_like import build
from kvpress_like.parity import PRESSES, Call, render_markdown, render_page
from kvpress_like.plugins import get_registry
from kvpress_like.testing import with_fitted_surrogate

PAGE = Path(__file__).resolve().parents[1] / "docs" / "kvpress-parity.md"
CALLS = [(entry.press, call) for entry in PRESSES for call in (entry.call, entry.alternative) if call is not None]
LENGTH = 160  # SnapKV with kvpress's window of 64 needs a budget of 64: half of 160 holds it


def _runnable(call: Call, tmp_path: Path) -> tuple[Call, dict]:
    """The call with its placeholders filled: a curve file for budget_curve, a question span for 'question'."""
    allocator = call.overrides.get("allocator")
    if isinstance(allocator, dict) and allocator.get("name") == "budget_curve":
        path = tmp_path / "curve.json"
        path.write_text(json.dumps({"model": "tiny llama", "layer_weights": [2.0, 1.0]}))
        call = replace(call, overrides={**call.overrides, "allocator": {**allocator, "path": str(path)}})
    prefill = dict(call.prefill)
    if "question_span" in prefill:
        prefill["question_span"] = (LENGTH - 12, LENGTH)
    return call, prefill


@pytest.mark.parametrize(("press", "call"), CALLS, ids=[f"{press}:{call.method}" for press, call in CALLS])
def test_every_call_on_the_page_builds_and_compresses(press, call, tmp_path):
    call, prefill = _runnable(call, tmp_path)
    kwargs = {} if call.budget is None else {"budget": call.budget}
    model = tiny_model("llama")
    pipeline = with_fitted_surrogate(build(call.method, decoding=call.decoding, **kwargs, **call.overrides), model)
    result = pipeline.prefill(model, random_ids(LENGTH, seed=1), **prefill)
    kept = [int(layer.kept_counts.sum()) for layer in result.report.layers.values()]
    assert kept and all(0 < k <= LENGTH * 2 for k in kept), press  # 2 KV heads of the tiny Llama


def test_rows_name_each_press_once_and_every_covered_method_is_registered():
    names = [entry.press for entry in PRESSES]
    assert len(names) == len(set(names))
    registered = set(get_registry().methods)
    assert {call.method for _, call in CALLS} <= registered
    assert all(entry.call is not None or entry.notes for entry in PRESSES), "an uncovered press needs its reason"


def test_the_page_is_the_rendering_of_the_records():
    page = render_page()
    if os.environ.get("KVPRESS_LIKE_WRITE_DOCS") == "1":
        PAGE.write_text(page)
    assert PAGE.read_text() == page, "docs/kvpress-parity.md is stale: rerun with KVPRESS_LIKE_WRITE_DOCS=1"


def test_the_table_shows_measured_agreement_only_from_a_record():
    figures = {"KnormPress": {"mean_jaccard": 0.912, "min_jaccard": 0.5}}
    rendered = render_markdown(figures)
    assert "| KnormPress | `build('knorm', budget=0.5)` | same score (−‖k‖) | 0.912 (min 0.500) |" in rendered
    assert render_markdown({}).count("| — |") == len(PRESSES)
