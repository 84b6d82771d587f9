"""The results pages' tables are their records' tables: each one names its source and equals its regeneration.

A page under ``docs/results`` takes every numeric table from a run's document (``summary.md``, ``probe.md``,
rendered again from the records) between ``<!-- table source=… -->`` and ``<!-- /table -->``
(:mod:`kvpress_like.eval.pages`). Regenerate them with ``python -m kvpress_like.eval.pages PAGE --write``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvpress_like.errors import ConfigError
from kvpress_like.eval.pages import render_page, unsourced_tables

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
PAGES = sorted(RESULTS.glob("*.md"))


def test_the_results_pages_are_checked():
    assert {"index.md", "research.md", "needle-ablation.md", "where-vs-what.md", "benchmark.md"} <= {
        p.name for p in PAGES}


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_table_of_a_results_page_is_regenerated_from_its_records(page):
    assert page.read_text() == render_page(page)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_a_results_page_has_no_numeric_table_without_a_source(page):
    assert unsourced_tables(page.read_text()) == []


def _page(tmp_path: Path, body: str) -> Path:
    page = tmp_path / "results" / "page.md"
    page.parent.mkdir()
    (page.parent / "ablation").symlink_to(RESULTS / "ablation")
    page.write_text(body)
    return page


MARKER = ('<!-- table source="ablation/summary.md" section="single_needle · question_aware · all lengths" '
          'caption="Accuracy" rows="snapkv, dapq" columns="10%, 80%" -->')


def test_a_table_typed_over_is_put_back_and_a_hand_typed_one_is_found(tmp_path):
    page = _page(tmp_path, f"{MARKER}\n\n| method | 10% | 80% |\n| --- | ---: | ---: |\n| snapkv | 99 | 99 |\n\n"
                           "<!-- /table -->\n\n| method | 10% |\n| --- | ---: |\n| dapq | 5 |\n")
    text = render_page(page)
    assert text != page.read_text()
    assert "| snapkv | 17 [7–34] | 100 [89–100] |\n| dapq | 0 [0–11] | 77 [59–88] |" in text  # the records' numbers
    assert unsourced_tables(text) == ["| method | 10% |"]


@pytest.mark.parametrize("attrs, error", [
    ('source="ablation/summary.md" section="no such block"', "no section"),
    ('source="ablation/summary.md" section="B95 overview" rows="no_such_method"', "no row"),
    ('source="ablation/missing.md"', "does not exist"),
    ('source="ablation/summary.md" section="B95 overview" caption="Nothing like this"', "no table"),
])
def test_a_marker_naming_what_its_source_lacks_is_an_error(tmp_path, attrs, error):
    page = _page(tmp_path, f"<!-- table {attrs} -->\n<!-- /table -->\n")
    with pytest.raises(ConfigError, match=error):
        render_page(page)
