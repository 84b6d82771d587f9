"""Every published ablation summary is what its records render to: no number typed by hand, none stale.

For each results folder that holds records (``cells.jsonl``) and the grid that produced them
(``grid.json``), the report module renders ``summary.md`` again from the records alone and it must equal
the committed one (the command line is taken from the committed file; the run's wall time is not in it).
Re-render a folder with ``python -m kvpress_like.eval.rerender FOLDER`` after changing the report.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvpress_like.eval.rerender import render_folder

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
FOLDERS = sorted(path.parent for path in RESULTS.rglob("cells.jsonl") if (path.parent / "grid.json").is_file())


def test_there_are_record_folders_to_check():
    assert len(FOLDERS) >= 5


@pytest.mark.parametrize("folder", FOLDERS, ids=[str(f.relative_to(RESULTS)) for f in FOLDERS])
def test_published_summary_is_rendered_from_its_records(folder):
    assert (folder / "summary.md").read_text() == render_folder(folder)
