"""The results pages' figures: drawn by the docs build hook from records, through kvpress_like.eval.plots.

The built site's figures are checked in tests/test_docs.py (one build for the whole docs suite); here the hook's
:func:`render` runs on small synthetic records.
"""

from __future__ import annotations

import importlib.util
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("mkdocs")

ROOT = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"


def load_hook():
    spec = importlib.util.spec_from_file_location("figures_hook", ROOT / "docs" / "hooks" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def drawn_svg(text: str) -> ET.Element:
    """The parsed SVG root; fails unless it is an ``<svg>`` document that draws paths."""
    root = ET.fromstring(text)
    assert root.tag == f"{SVG}svg", root.tag
    drawn = [p for p in root.iter(f"{SVG}path") if p.get("d")]
    assert len(drawn) >= 10, f"only {len(drawn)} drawn paths"
    return root


def ablation_row(method: str, budget: str, length: int | str, accuracy: float, protocol: str) -> dict:
    return {"task": "toy", "protocol": protocol, "length": length, "method": method, "budget": budget, "n": 10,
            "accuracy": accuracy, "ci_low": max(accuracy - 0.2, 0.0), "ci_high": min(accuracy + 0.2, 1.0)}


def bench_row(method: str, length: int, prefill: float, peak: float | None) -> dict:
    return {"length": length, "method": method, "prefill_ratio": prefill, "peak_ratio": peak,
            "cache_fraction": 1.0 if method == "full" else 256 / length}


@pytest.fixture
def results(tmp_path) -> Path:
    """A results folder with one ablation record and one benchmark record."""
    table = [ablation_row("full", "100%", length, 1.0, protocol)
             for length in (512, 1024) for protocol in ("question_aware", "query_agnostic")]
    table += [ablation_row(method, budget, length, accuracy, protocol)
              for method, scale in (("dapq", 1.0), ("snapkv", 0.8))
              for length in (512, 1024)
              for protocol in ("question_aware", "query_agnostic")
              for budget, accuracy in (("10%", 0.2 * scale), ("50%", 0.9 * scale))]
    rows = [bench_row(method, length, prefill, peak)
            for length in (1024, 2048)
            for method, prefill, peak in (("full", 1.0, 1.0), ("dapq", 1.05, 1.0), ("h2o", 1.9, None))]
    write(tmp_path / "ablation" / "summary.json", {"table": table})
    write(tmp_path / "bench" / "bench.json", {"rows": rows})
    return tmp_path


def write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_every_record_gets_valid_svg_figures(results):
    figures = load_hook().render(results)
    assert set(figures) == {"ablation/accuracy_vs_budget_toy.svg", "bench/prefill_ratio.svg", "bench/peak_ratio.svg"}
    for text in figures.values():
        drawn_svg(text)
    assert "<!-- n/a -->" in figures["bench/peak_ratio.svg"]  # h2o's unmeasured peak is marked, not drawn as 1.0
    assert "<!-- n/a -->" not in figures["bench/prefill_ratio.svg"]
    assert "<!-- 1.90 -->" in figures["bench/prefill_ratio.svg"]


def test_only_the_linked_folders_are_drawn(results):
    assert set(load_hook().render(results, {"bench"})) == {"bench/prefill_ratio.svg", "bench/peak_ratio.svg"}


def test_a_figure_changes_exactly_when_its_record_changes(results):
    hook = load_hook()
    before = hook.render(results)
    assert hook.render(results) == before  # no date, fixed ids: the same record draws the same bytes

    summary = results / "ablation" / "summary.json"
    record = json.loads(summary.read_text())
    next(r for r in record["table"] if r["method"] == "dapq")["accuracy"] = 0.3  # inside its interval
    write(summary, record)
    after = hook.render(results)
    assert after["ablation/accuracy_vs_budget_toy.svg"] != before["ablation/accuracy_vs_budget_toy.svg"]
    assert after["bench/prefill_ratio.svg"] == before["bench/prefill_ratio.svg"]

    bench = results / "bench" / "bench.json"
    record = json.loads(bench.read_text())
    record["rows"][1]["prefill_ratio"] = 1.25
    write(bench, record)
    final = hook.render(results)
    assert final["bench/prefill_ratio.svg"] != after["bench/prefill_ratio.svg"]
    assert "<!-- 1.25 -->" in final["bench/prefill_ratio.svg"]
    assert final["bench/peak_ratio.svg"] == after["bench/peak_ratio.svg"]


def test_a_record_that_cannot_be_drawn_fails_the_build_with_its_path(results):
    from mkdocs.exceptions import PluginError

    write(results / "broken" / "summary.json", {"rows": []})
    with pytest.raises(PluginError, match="broken"):
        load_hook().render(results)


def test_save_writes_png_or_svg_by_the_suffix(tmp_path):
    from kvpress_like.eval import plots

    rows = [bench_row("full", 1024, 1.0, 1.0), bench_row("dapq", 1024, 1.1, 1.0)]
    for suffix in ("png", "svg"):
        figure = plots.ratio_bars(rows, "prefill_ratio", "ratio")
        assert plots.save(figure, tmp_path / f"bars.{suffix}") == f"bars.{suffix}"
    assert (tmp_path / "bars.png").read_bytes().startswith(b"\x89PNG")
    drawn_svg((tmp_path / "bars.svg").read_text())
