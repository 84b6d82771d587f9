"""CLI smoke runs of eval, ablate, bench and probe on the toy model folder (seconds, no real model)."""

from __future__ import annotations

import json

import pytest

from kvpress_like import build
from kvpress_like.cli import main
from kvpress_like.errors import ConfigError
from kvpress_like.eval import bench
from kvpress_like.eval.tasks import load_jsonl
from kvpress_like.eval.toy import save_toy_model
from kvpress_like.models import load_model


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return str(save_toy_model(tmp_path_factory.mktemp("toy")))


def test_list_still_works(capsys):
    assert main(["list"]) == 0
    assert "dapq" in capsys.readouterr().out


def test_eval_writes_tables_plots_and_samples(toy_dir, tmp_path, capsys):
    out, samples = tmp_path / "eval", tmp_path / "samples.jsonl"
    argv = ["eval", "--model", toy_dir, "--length", "150", "--samples", "2", "--method", "full", "--method", "dapq",
            "--budget", "30%", "--budget", "60%", "--out", str(out), "--no-progress", "--save-samples", str(samples),
            "--scorer", '{"pooling": "avg", "kernel": 3}']
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "query_agnostic" in printed and "question_aware" in printed and "kvpress-like eval" in printed
    for name in ("summary.md", "summary.csv", "summary.json", "cells.jsonl", "accuracy_vs_budget_single_needle.png",
                 "recall_per_layer_single_needle.png", "heatmap_single_needle_question_aware.png"):
        assert (out / name).is_file(), name
    assert len(load_jsonl(samples)) == 2
    grid = json.loads((out / "grid.json").read_text())["grid"]
    assert grid["methods"][1]["scorer"] == {"pooling": "avg", "kernel": 3}

    data_out = tmp_path / "from_data"
    assert main(["eval", "--model", toy_dir, "--data", str(samples), "--protocol", "question_aware", "--budget", "50%",
                 "--out", str(data_out), "--no-progress", "--no-attention-metrics"]) == 0
    cells = (data_out / "cells.jsonl").read_text().splitlines()
    assert len(cells) == 2 and "recall" not in json.loads(cells[0])["rows"][0]

    batched = tmp_path / "batched"
    assert main(["eval", "--model", toy_dir, "--data", str(samples), "--protocol", "question_aware", "--budget", "50%",
                 "--out", str(batched), "--no-progress", "--batch-size", "2"]) == 0
    records = [json.loads(line) for line in (batched / "cells.jsonl").read_text().splitlines()]
    assert [r["reference"]["timing"]["prefill_batch"] for r in records] == [2, 2]
    with pytest.raises(ConfigError, match="batch_size: Input should be greater than or equal to 1"):
        main(["eval", "--model", toy_dir, "--data", str(samples), "--out", str(tmp_path / "bad"), "--batch-size", "0"])


def test_ablate_runs_then_resumes(toy_dir, tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"name: smoke\nmodel: {toy_dir}\ntasks: [passkey, multi_key]\nlengths: [120, 200]\nsamples: 1\n"
        "protocols: [question_aware]\nbudgets: ['25%', '50%']\nmethods: [full, dapq]\nwindows: [null, suffix]\n"
    )
    out = tmp_path / "out"
    assert main(["ablate", str(grid), "--out", str(out), "--no-progress"]) == 0
    assert "4 cells" in capsys.readouterr().out
    assert main(["ablate", str(grid), "--out", str(out), "--no-progress"]) == 0
    assert "0 run now" in capsys.readouterr().out
    table = json.loads((out / "summary.json").read_text())["table"]
    assert {r["method"] for r in table} == {"full", "dapq", "dapq+window=suffix"}
    assert {r["length"] for r in table} == {120, 200, "all"}


def test_bench_prints_ratios(toy_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--model", toy_dir, "--lengths", "128", "256", "--methods", "full", "dapq",
                 "--budget", "32", "--repeats", "1", "--decode-tokens", "2", "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    # `full` named on purpose: our prefill with nothing dropped, beside the model's own plain prefill
    assert [r["method"] for r in rows] == ["full (plain prefill)", "full", "dapq"] * 2
    assert rows[1]["cache_fraction"] == 1.0 and rows[1]["peak_bytes"] > 0
    dapq = rows[2]
    assert dapq["prefill_ratio"] > 0 and dapq["decode_ratio"] > 0 and dapq["peak_bytes"] > 0
    assert dapq["cache_fraction"] == pytest.approx(32 / 128)
    assert rows[0]["prefill_ratio_median"] == 1.0 and dapq["prefill_ratio_median"] > 0
    printed = capsys.readouterr().out
    assert "ratio to plain prefill" in printed and "median ratio per repeat" in printed


def test_the_median_ratio_per_repeat_pairs_each_run_with_the_plain_prefill_of_its_repeat(toy_dir, monkeypatch):
    times = iter([1.0, 1.5, 2.0, 2.2, 4.0, 4.0])  # plain, method; plain, method; plain, method
    monkeypatch.setattr(bench, "_timed", lambda fn: (next(times), fn()))
    model, tokenizer = load_model(toy_dir)
    pipeline, attentions = build("dapq", budget=8), []
    prefill = pipeline.prefill
    pipeline.prefill = lambda *a, **k: attentions.append(model.config._attn_implementation) or prefill(*a, **k)
    rows = bench.run_bench(model, tokenizer, [("dapq", pipeline)], [64], repeats=3, decode_tokens=0,
                           progress=False)["rows"]
    # one untimed run first, so every timed run starts on the attention that a pruning prefill leaves
    assert attentions == ["sdpa", "kvpress_like", "kvpress_like", "kvpress_like"]
    assert rows[1]["prefill_ratio"] == pytest.approx(1.5)  # fastest against fastest: 1.5 / 1.0
    assert rows[1]["prefill_ratio_median"] == pytest.approx(1.1)  # median of 1.5, 1.1 and 1.0
    assert rows[0]["prefill_s_each"] == [1.0, 2.0, 4.0] and rows[1]["prefill_s_each"] == [1.5, 2.2, 4.0]


def test_probe_reproduces_table1_structure(toy_dir, tmp_path, capsys):
    out = tmp_path / "probe"
    assert main(["probe", "--model", toy_dir, "--length", "160", "--samples", "2", "--n-true", "8",
                 "--window-sizes", "4", "8", "--budgets", "10%", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "probe.json").read_text())
    table1 = result["summary"]["table1"]
    assert table1["SC&SP"]["post"]["mean"] == pytest.approx(1.0)
    # before RoPE, the first layer's queries depend on the token only: right content = identical queries
    assert table1["SC&DP"]["pre"]["layers"][0] == pytest.approx(1.0, abs=1e-5)
    # a rotation by the same angles preserves cosines: same positions give equal pre/post similarity
    assert table1["DC&SP"]["pre"]["mean"] == pytest.approx(table1["DC&SP"]["post"]["mean"], abs=1e-5)
    windows = result["summary"]["windows"]
    assert {"pseudo/4", "pseudo/8", "suffix/4", "suffix/8", "question/all"} <= set(windows)
    assert 0 <= windows["pseudo/8"]["recall@10%"]["mean"] <= 1
    assert (out / "probe.md").is_file() and (out / "probe_layers.png").is_file()
    assert "Table 1" in capsys.readouterr().out
