"""Protocols, the per-sample engine (on a toy model) and resumable grids."""

from __future__ import annotations

import json

import pytest
import torch

import kvpress_like
from kvpress_like import build
from kvpress_like.errors import ConfigError
from kvpress_like.eval import runner
from kvpress_like.eval.engine import Candidate, evaluate_batch, evaluate_sample
from kvpress_like.eval.grid import parse_grid
from kvpress_like.eval.protocols import prepare
from kvpress_like.eval.records import read_cells
from kvpress_like.eval.runner import run_grid
from kvpress_like.eval.summary import write_run_summary
from kvpress_like.eval.tasks import TASKS
from kvpress_like.eval.toy import byte_tokenizer, toy_model
from kvpress_like.plugins import get_registry
from kvpress_like.prompting import build_prompt


def grid_run(grid, out, *args, **kwargs):
    """``grid`` run into ``out`` and its summary written, as the command line does; returns the summary."""
    return write_run_summary(grid, run_grid(grid, out, *args, **kwargs))


@pytest.fixture(scope="module")
def toy():
    model = toy_model(seed=3)
    return model, byte_tokenizer()


@pytest.fixture(scope="module")
def sample(toy):
    return TASKS["passkey"].generate(toy[1], 220, 0.5, 1)


def test_prepare_protocols(toy, sample):
    tokenizer = toy[1]
    plain = build_prompt(tokenizer, sample.context, sample.question)
    prefix = tokenizer.encode(sample.answer_prefix, add_special_tokens=False)
    aware = prepare(tokenizer, sample, "question_aware")
    agnostic = prepare(tokenizer, sample, "query_agnostic")
    assert torch.equal(aware.input_ids, agnostic.input_ids)
    assert aware.input_ids[0, -len(prefix) :].tolist() == prefix
    assert aware.compress_length == aware.length == plain.input_ids.shape[1] + len(prefix)
    assert aware.question_span == plain.question_span
    assert agnostic.compress_length == plain.context_length and agnostic.question_span is None
    assert prepare(tokenizer, sample, "question_aware", answer_prefix=False).length == plain.input_ids.shape[1]
    with pytest.raises(ConfigError, match="valid protocols"):
        prepare(tokenizer, sample, "both")


def _candidates(specs):
    registered = get_registry().methods
    return [Candidate(label, budget, build(method, budget=budget, **over))
            for label, method, budget, over in specs if method in registered]


SPECS = [
    ("dapq", "dapq", "100%", {}),
    ("dapq", "dapq", "20%", {}),
    ("dapq", "dapq", "40%", {}),  # shares the 20% row's scores
    ("semantic", "dapq", "20%", {"window": "semantic"}),
    ("suffix", "dapq", "20%", {"window": "suffix", "scorer": {"pooling": "avg", "kernel": 7}}),
    ("pyramidkv", "pyramidkv", "40%", {}),  # per-layer budgets: uneven layers
    ("ada_dapq", "ada_dapq", "40%", {}),  # per-head budgets: ragged layers
    ("too_small", "dapq", 8, {"selector": {"recent": 32}}),  # cannot run: more protected tokens than budget
]


@pytest.mark.parametrize("protocol", ["question_aware", "query_agnostic"])
def test_engine_rows_batched_and_shared_equal_one_by_one(toy, sample, protocol):
    model, tokenizer = toy
    batched = evaluate_sample(model, tokenizer, sample, protocol, _candidates(SPECS), batch=True)
    single = evaluate_sample(model, tokenizer, sample, protocol, _candidates(SPECS), batch=False)
    timing = ("prefill_seconds", "timing")
    assert {k: v for k, v in batched.reference.items() if k not in timing} == {
        k: v for k, v in single.reference.items() if k not in timing
    }
    assert max(r.get("batch_size", 1) for r in batched.rows) > 1  # the 20% rows shared a batch
    for a, b in zip(batched.rows, single.rows, strict=True):
        assert (a["label"], a["budget"], a["error"]) == (b["label"], b["budget"], b["error"])
        if a["error"] is None:
            assert a["answer"] == b["answer"]
            assert a["kl"] == pytest.approx(b["kl"], abs=1e-4)
            assert a["recall_layers"] == pytest.approx(b["recall_layers"], abs=1e-6)

    full = batched.rows[0]
    assert full["answer"] == batched.reference["answer"] and full["token_match"] == 1.0
    assert full["kl"] == pytest.approx(0.0, abs=1e-6) and full["recall"] == pytest.approx(1.0)
    compressed = batched.rows[1]
    assert compressed["recall"] < 1.0 and 0.15 < compressed["cache_fraction"] < 0.25
    # similarity depends on the window only: one value for every budget of a window, the same batched or not
    similarity = {(r["label"], r["budget"]): r["similarity"] for r in batched.rows if r["error"] is None}
    assert similarity[("dapq", "100%")] == similarity[("dapq", "20%")] == similarity[("dapq", "40%")]
    assert similarity == {(r["label"], r["budget"]): r["similarity"] for r in single.rows if r["error"] is None}
    assert similarity[("suffix", "20%")] != similarity[("dapq", "20%")]
    layers = [value for value in compressed["similarity_layers"] if value is not None]
    assert len(layers) == model.config.num_hidden_layers
    assert compressed["similarity"] == pytest.approx(sum(layers) / len(layers), abs=1e-4)
    assert len(compressed["recall_layers"]) == model.config.num_hidden_layers
    assert "protected tokens" in batched.rows[-1]["error"]


def _same_result(got, want) -> None:
    """Two results of one sample: equal answers, errors and kept sizes; metrics equal up to float noise."""
    timing = ("prefill_seconds", "timing")
    assert {k: v for k, v in got.reference.items() if k not in timing} == {
        k: v for k, v in want.reference.items() if k not in timing
    }
    for a, b in zip(got.rows, want.rows, strict=True):
        assert (a["label"], a["budget"], a["error"]) == (b["label"], b["budget"], b["error"])
        if a["error"] is None:
            assert (a["answer"], a["budget_tokens"], a["cache_bytes"]) == (b["answer"], b["budget_tokens"],
                                                                           b["cache_bytes"])
            assert a["kl"] == pytest.approx(b["kl"], abs=1e-4)
            assert a["recall_layers"] == pytest.approx(b["recall_layers"], abs=1e-5)
            assert a["similarity_layers"] == pytest.approx(b["similarity_layers"], abs=1e-5)
    assert len(got.followups) == len(want.followups)
    for a, b in zip(got.followups, want.followups, strict=True):
        _same_result(a, b)


@pytest.mark.parametrize("protocol", ["question_aware", "query_agnostic"])
def test_a_batch_of_samples_gives_each_sample_its_result_alone(toy, protocol):
    """Prompts of different lengths share one left-padded prompt forward; each result equals the sample alone."""
    model, tokenizer = toy
    samples = [TASKS["passkey"].generate(tokenizer, n, 0.5, seed) for n, seed in ((220, 1), (160, 2), (300, 3))]
    candidates = _candidates(SPECS[:-1])
    batch = evaluate_batch(model, tokenizer, samples, protocol, candidates)
    assert len({r.reference["prompt_tokens"] for r in batch}) == 3
    for got, sample in zip(batch, samples, strict=True):
        assert got.reference["timing"]["prefill_batch"] == 3
        _same_result(got, evaluate_sample(model, tokenizer, sample, protocol, candidates))


def test_a_configuration_that_fails_on_one_sample_of_a_batch_fails_there_only(toy):
    """200 protected tokens fit the longer prompt's 60% budget only: the error lands on the shorter sample."""
    model, tokenizer = toy
    samples = [TASKS["passkey"].generate(tokenizer, n, 0.5, 1) for n in (400, 160)]
    candidates = _candidates([("dapq", "dapq", "20%", {}), ("picky", "dapq", "60%", {"selector": {"recent": 200}})])
    batch = evaluate_batch(model, tokenizer, samples, "question_aware", candidates)
    assert batch[0].rows[1]["error"] is None and "protected tokens" in batch[1].rows[1]["error"]
    for got, sample in zip(batch, samples, strict=True):
        _same_result(got, evaluate_sample(model, tokenizer, sample, "question_aware", candidates))


def _grid(**extra):
    raw = {"name": "t", "model": "toy", "tasks": ["passkey"], "lengths": [160], "samples": 2,
           "protocols": ["question_aware"], "budgets": ["50%"], "methods": ["full", "dapq"], **extra}
    return parse_grid(raw)


def test_grid_resumes_and_runs_only_missing_pairs(toy, tmp_path, monkeypatch):
    model, tokenizer = toy
    summary = grid_run(_grid(), tmp_path, model, tokenizer, progress=False)
    assert summary["timing"]["cells_run_now"] == 2
    assert len(read_cells(tmp_path / "cells.jsonl")) == 2
    for name in ("summary.json", "summary.csv", "summary.md", "grid.json"):
        assert (tmp_path / name).is_file()
    methods = {(r["method"], r["budget"]) for r in summary["table"]}
    assert methods == {("full", "100%"), ("dapq", "50%")}

    calls = []
    real = runner.evaluate_batch

    def spy(model, tokenizer, samples, protocol, candidates, **kwargs):
        calls.extend([c.label for c in candidates] for _ in samples)
        return real(model, tokenizer, samples, protocol, candidates, **kwargs)

    monkeypatch.setattr(runner, "evaluate_batch", spy)
    again = grid_run(_grid(), tmp_path, model, tokenizer, progress=False)
    assert calls == [] and again["timing"]["cells_run_now"] == 0  # every cell finished: nothing runs

    wider = _grid(methods=["full", "dapq", {"label": "sem", "method": "dapq", "window": "semantic"}])
    grid_run(wider, tmp_path, model, tokenizer, progress=False)
    assert calls == [["sem"], ["sem"]]  # only the new pair, once per cell

    lines = (tmp_path / "cells.jsonl").read_text().splitlines()
    (tmp_path / "cells.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])  # an interrupted write
    calls.clear()
    final = grid_run(wider, tmp_path, model, tokenizer, progress=False)
    assert calls == [["sem"]]
    assert {(r["method"], r["budget"]) for r in final["table"]} == {("full", "100%"), ("dapq", "50%"), ("sem", "50%")}
    assert all(r["n"] == 2 for r in final["table"])


def _close(a, b, path="record") -> None:
    """Records equal but for timing, floats up to the noise of a batched forward."""
    if isinstance(a, dict):
        keys = set(a) - {"seconds", "timing", "prefill_seconds", "compress_seconds"}
        assert keys == set(b) - {"seconds", "timing", "prefill_seconds", "compress_seconds"}, path
        for key in keys:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-4), path
    else:
        assert a == b, path


def test_a_grid_run_in_batches_writes_the_records_of_a_run_one_by_one(toy, tmp_path):
    model, tokenizer = toy
    grid = _grid(lengths=[160, 300], samples=3, protocols=["question_aware", "query_agnostic"])
    grid_run(grid, tmp_path / "one", model, tokenizer, progress=False)
    grid_run(grid.model_copy(update={"batch_size": 4}), tmp_path / "four", model, tokenizer, progress=False)
    one, four = ({r["cell"]: r for r in read_cells(tmp_path / name / "cells.jsonl")} for name in ("one", "four"))
    assert sorted(one) == sorted(four) and len(one) == 12
    assert {r["reference"]["timing"].get("prefill_batch") for r in four.values()} == {4, 2}  # 6 cells per protocol
    for cell, record in one.items():
        _close(four[cell], record, cell)


def test_grid_refuses_to_mix_settings_and_names_bad_entries(toy, tmp_path):
    model, tokenizer = toy
    grid_run(_grid(samples=1), tmp_path, model, tokenizer, progress=False)
    with pytest.raises(ConfigError, match="other settings"):
        grid_run(_grid(samples=1, answer_prefix=False), tmp_path, model, tokenizer, progress=False)
    with pytest.raises(ConfigError, match="valid settings"):
        parse_grid({"lenghts": [1]})
    with pytest.raises(ConfigError, match="invalid budget"):
        parse_grid({"budgets": ["150%"]})
    with pytest.raises(ConfigError, match="batch_size: Input should be greater than or equal to 1"):
        parse_grid({"batch_size": 0})
    with pytest.raises(ConfigError, match="interim_factor applies to progressive prefills: set prompt_chunk too"):
        parse_grid({"interim_factor": 2})
    with pytest.raises(ConfigError, match="dapq"):  # the unknown method's error names the valid ones
        grid_run(_grid(methods=["nope"]), tmp_path / "other", model, tokenizer, progress=False)


def test_a_run_recorded_before_a_setting_existed_resumes_when_the_setting_has_its_default(toy, tmp_path):
    model, tokenizer = toy
    grid_run(_grid(samples=1), tmp_path, model, tokenizer, progress=False)
    stored = json.loads((tmp_path / "grid.json").read_text())
    del stored["identity"]["interim_factor"]  # as written by a version without the setting
    (tmp_path / "grid.json").write_text(json.dumps(stored))
    grid_run(_grid(samples=2), tmp_path, model, tokenizer, progress=False)
    assert len(read_cells(tmp_path / "cells.jsonl")) == 2
    (tmp_path / "grid.json").write_text(json.dumps(stored))
    with pytest.raises(ConfigError, match="interim_factor"):
        grid_run(_grid(samples=2, prompt_chunk=64, interim_factor=2), tmp_path, model, tokenizer, progress=False)


def test_a_full_cache_only_grid_reports_the_full_cache_without_empty_tables(toy, tmp_path):
    model, tokenizer = toy
    grid_run(_grid(methods=["full"]), tmp_path, model, tokenizer, progress=False)
    text = (tmp_path / "summary.md").read_text()
    assert "Full cache: " in text and "the full cache's accuracy is the result" in text
    assert "| method |  |" not in text and "**Retention" not in text


def test_windows_axis_multiplies_methods():
    grid = _grid(methods=["full", "dapq"], windows=[None, "suffix", {"name": "semantic", "position_start": 5}])
    names = [e.name for e in grid.method_entries()]
    assert names == ["full", "dapq", "dapq+window=suffix", "dapq+window={name:semantic,position_start:5}"]


@pytest.mark.parametrize("correct_at_25", [2, 1])
def test_summary_markdown_reports_ci_and_b95(toy, tmp_path, correct_at_25):
    model, tokenizer = toy
    grid = _grid(budgets=["25%", "100%"], samples=2)
    grid_run(grid, tmp_path, model, tokenizer, progress=False)
    # The toy model answers nonsense: give the records known outcomes (the full cache right on both
    # samples, dapq at 100% too, dapq at 25% on ``correct_at_25`` of them) and summarise them again.
    cells = tmp_path / "cells.jsonl"
    records = [json.loads(line) for line in cells.read_text().splitlines()]
    for i, record in enumerate(records):
        record["reference"]["correct"] = True
        for row in record["rows"]:
            row["correct"] = row["budget"] == "100%" or i < correct_at_25
    cells.write_text("".join(json.dumps(record) + "\n" for record in records))
    summary = grid_run(grid, tmp_path, model, tokenizer, progress=False)
    assert summary["timing"]["cells_run_now"] == 0

    rows = {(r["method"], r["budget"]): r for r in summary["table"]}
    retention_at_25 = (correct_at_25 / 2) / 1.0  # dapq's accuracy / the full cache's, same samples
    assert rows[("dapq", "25%")]["retention"] == pytest.approx(retention_at_25)
    assert rows[("dapq", "100%")]["retention"] == rows[("full", "100%")]["accuracy"] == 1.0
    expected_b95 = "25%" if retention_at_25 >= 0.95 else "100%"  # retention at 100% is 1.0
    data = json.loads((tmp_path / "summary.json").read_text())
    assert {r["method"]: r["b95"] for r in data["b95"]} == {"dapq": expected_b95}
    text = (tmp_path / "summary.md").read_text()
    assert "Wilson 95%" in text and "| dapq |" in text and "B95" in text


def test_records_carry_the_resolved_configuration_and_provenance(toy, tmp_path):
    model, tokenizer = toy
    grid_run(_grid(samples=1), tmp_path, model, tokenizer, progress=False)
    (record,) = read_cells(tmp_path / "cells.jsonl")
    (row,) = record["rows"]
    assert row["config"] == build("dapq", budget="50%").config
    assert record["provenance"]["version"] == kvpress_like.__version__
    assert record["provenance"]["commit"] is None or len(record["provenance"]["commit"].split("+")[0]) == 40


def test_resuming_refuses_a_method_that_now_resolves_differently(toy, tmp_path):
    """A label whose method was redefined after its cells were written must not silently mix two methods."""
    model, tokenizer = toy
    grid_run(_grid(samples=2), tmp_path, model, tokenizer, progress=False)
    lines = (tmp_path / "cells.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["rows"][0]["config"]["scorer"]["pooling"] = "max"  # as if dapq had pooled when this cell ran
    (tmp_path / "cells.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    with pytest.raises(ConfigError, match="now resolves to"):
        grid_run(_grid(samples=2), tmp_path, model, tokenizer, progress=False)


def test_resuming_a_method_whose_configuration_holds_tuples_is_not_refused(toy, tmp_path):
    """KVzip's window options hold tuples of ids, which a record reads back as lists: the same configuration."""
    model, tokenizer = toy
    grid = _grid(methods=["full", "kvzip"], samples=1)
    grid_run(grid, tmp_path, model, tokenizer, progress=False)
    wider = _grid(methods=["full", "kvzip", "snapkv"], samples=1)
    summary = grid_run(wider, tmp_path, model, tokenizer, progress=False)
    assert {r["method"] for r in summary["table"]} == {"full", "kvzip", "snapkv"}


def test_a_grid_of_progressive_prefills_records_each_method_or_why_it_cannot_stream(toy, tmp_path):
    """With ``prompt_chunk`` every candidate runs a progressive prefill: one chunk as long as the prompt gives the
    rows of a one-pass run; a method that cannot stream records why; the setting is part of the grid's identity."""
    model, tokenizer = toy
    methods = ["full", "snapkv", "pyramidkv", "expected_attention",
               {"label": "kvzip_layers", "method": "kvzip", "allocator": "global_layers"}]
    grid_run(_grid(methods=methods, samples=2), tmp_path / "one", model, tokenizer, progress=False)
    grid_run(_grid(methods=methods, samples=2, prompt_chunk=4096), tmp_path / "whole", model, tokenizer,
             progress=False)
    for once, whole in zip(*(read_cells(tmp_path / name / "cells.jsonl") for name in ("one", "whole")), strict=True):
        for a, b in zip(once["rows"], whole["rows"], strict=True):
            if a["label"] != "kvzip_layers":
                assert (a["answer"], a["budget_tokens"], a["recall_layers"]) == (b["answer"], b["budget_tokens"],
                                                                                 b["recall_layers"])
                assert a["kl"] == pytest.approx(b["kl"], abs=1e-6)
    grid_run(_grid(methods=methods, samples=2, prompt_chunk=64), tmp_path / "small", model, tokenizer, progress=False)
    grid_run(_grid(methods=methods, samples=2, prompt_chunk=64, batch_size=2), tmp_path / "batched", model, tokenizer,
             progress=False)  # progressive prefills share no forward: a batch runs its samples one by one
    for alone, batched in zip(*(read_cells(tmp_path / n / "cells.jsonl") for n in ("small", "batched")), strict=True):
        assert [r["answer"] for r in alone["rows"] if r["error"] is None] == [
            r["answer"] for r in batched["rows"] if r["error"] is None]
        assert "prefill_batch" not in batched["reference"]["timing"]
    for record in read_cells(tmp_path / "small" / "cells.jsonl"):
        rows = {row["method"]: row for row in record["rows"]}
        assert "ranks every layer's scores of the whole prompt" in rows["kvzip"]["error"]
        assert rows["expected_attention"]["error"] is None
        assert rows["snapkv"]["error"] is None and rows["snapkv"]["budget_tokens"] == record["reference"][
            "prompt_tokens"] // 2
    with pytest.raises(ConfigError, match="prompt_chunk"):
        grid_run(_grid(methods=methods, samples=2), tmp_path / "small", model, tokenizer, progress=False)
