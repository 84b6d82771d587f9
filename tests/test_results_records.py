"""Every published results document is what its records render to, and every record says where its pipeline
configuration comes from.

For each results folder that holds records (``cells.jsonl`` with the ``grid.json`` that produced them, or a probe's
``probe.json``), the report renders the document (``summary.md``, ``probe.md``) again from the records alone and it
must equal the committed one (the command line is taken from the committed file; the run's wall time is not in it).
Re-render a folder with ``python -m kvpress_like.eval.rerender FOLDER`` after changing the report.

Records made before runs stored each row's resolved configuration carry it backfilled from ``grid.json``
(``python -m kvpress_like.eval.backfill``): only the labels whose re-run reproduced the records have one, and it
must still be what the label resolves to.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvpress_like import build
from kvpress_like.eval.backfill import BACKFILLED, backfill, compare
from kvpress_like.eval.grid import candidate, parse_grid
from kvpress_like.eval.records import CELLS_FILE, GRID_FILE, read_cells
from kvpress_like.eval.rerender import DOCUMENTS, document, render_folder

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
ABLATIONS = sorted(path.parent for path in RESULTS.rglob(CELLS_FILE) if (path.parent / GRID_FILE).is_file())
FOLDERS = sorted([*ABLATIONS, *(path.parent for record in DOCUMENTS for path in RESULTS.rglob(record))])


def _ids(folders):
    return [str(f.relative_to(RESULTS)) for f in folders]


def test_there_are_record_folders_to_check():
    assert len(ABLATIONS) >= 5 and len(FOLDERS) > len(ABLATIONS)


@pytest.mark.parametrize("folder", FOLDERS, ids=_ids(FOLDERS))
def test_published_document_is_rendered_from_its_records(folder):
    assert document(folder).read_text() == render_folder(folder)


@pytest.mark.parametrize("folder", ABLATIONS, ids=_ids(ABLATIONS))
def test_every_row_carries_the_configuration_its_label_resolves_to_or_none_if_unverified(folder):
    grid = parse_grid(json.loads((folder / GRID_FILE).read_text())["grid"])
    entries = {entry.name: entry for entry in grid.method_entries()}
    resolved = {}
    for record in read_cells(folder / CELLS_FILE):
        stamp = record.get("provenance")
        assert stamp, f"{record['cell']}: a record without provenance"
        backfilled = stamp.get("config") == BACKFILLED
        if backfilled:
            assert stamp["version"] is None and stamp["commit"] is None  # the run's own code is not known
            assert stamp["check"]["cells"] and stamp["check"]["rows_compared"] > 0
        trusted = set(stamp["check"]["reproduced"]) if backfilled else set(entries)
        for row in [row for question in [record, *record.get("followups", [])] for row in question["rows"]]:
            if row["label"] not in trusted:
                assert row["config"] is None, (row["label"], row["budget"])
                continue
            if row["config"] is None:  # a budget the method refuses to build: the row recorded the refusal
                assert row.get("error"), (row["label"], row["budget"])
                continue
            key = (row["label"], str(row["budget"]))
            if key not in resolved:
                config = candidate(entries[row["label"]], key[1]).pipeline.config
                resolved[key] = json.loads(json.dumps(config))  # as a record holds it (tuples become lists)
            assert row["config"] == resolved[key], f"{key} now resolves to another configuration"


def _record(answers: dict[str, str], error: str | None = None) -> dict:
    rows = [{"label": label, "budget": "10%", "answer": answer, "correct": answer == "42", "budget_tokens": 7,
             "error": error if label == "snapkv" else None} for label, answer in answers.items()]
    return {"cell": "t|1|question_aware|0", "reference": {"answer": "42", "correct": True}, "rows": rows}


def test_the_backfill_check_names_the_labels_whose_rerun_differs_and_ignores_an_error_reworded():
    recorded = _record({"snapkv": "42", "dapq": "41"}, error="ConfigError: 32 protected tokens do not fit")
    again = _record({"snapkv": "42", "dapq": "4"}, error="ConfigError: 32 protected tokens (sinks=0) do not fit")
    check = compare([(recorded, again)])
    assert (check["reproduced"], check["differ"], check["rows_compared"]) == (["snapkv"], ["dapq"], 2)
    assert check["examples"][0]["answer"] == ["41", "4"]
    again["reference"]["answer"] = "43"
    assert "full" in compare([(recorded, again)])["differ"]


def test_backfill_gives_only_reproduced_labels_a_configuration_and_keeps_recorded_provenance():
    grid = parse_grid({"methods": ["full", "snapkv", "dapq"], "budgets": ["10%"]})
    recorded = _record({"snapkv": "42", "dapq": "41"})
    already = {**_record({"snapkv": "42"}), "provenance": {"version": "0.1.0", "commit": "abc"}}
    check = compare([(recorded, _record({"snapkv": "42", "dapq": "4"}))])
    filled, kept = backfill(grid, [recorded, already], check, first_committed="def")
    assert kept == already
    assert filled["provenance"]["config"] == BACKFILLED and filled["provenance"]["check"] == check
    assert filled["provenance"]["backfill"]["first_committed"] == "def" and filled["provenance"]["commit"] is None
    configs = {row["label"]: row["config"] for row in filled["rows"]}
    assert configs == {"snapkv": build("snapkv", budget="10%").config, "dapq": None}
