"""``kvpress-like demo`` (which lives next to the evaluation harness) on the embedded SmolLM2-135M."""

from __future__ import annotations

import pytest
from conftest import NEEDS_SMOLLM2

from kvpress_like import Budget
from kvpress_like.cli import main
from kvpress_like.eval import demo

pytestmark = [pytest.mark.model, NEEDS_SMOLLM2]


def test_demo_command_prints_every_setting_with_its_budget(smollm2, monkeypatch, capsys):
    monkeypatch.setattr(demo, "load_model", lambda name: smollm2)  # the session's model, loaded once
    assert main(["demo", "--context-tokens", "400"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    expected = [(label, budget) for label, _, budget, _ in demo.DEMO_SETTINGS]
    assert [(row[0].lstrip("| "), row[1]) for row in rows] == expected
    full_length = int(rows[0][2].split(" of ")[1])
    for row in rows:
        kept, length = (int(n) for n in row[2].split(" of "))
        assert length == full_length and kept == Budget.model_validate(row[1]).resolve(length)
    assert rows[0][4] == "yes"  # the full cache finds the needle
