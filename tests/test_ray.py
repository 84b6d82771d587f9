"""Grids on a local Ray cluster: the same records and summary as a local run, resumption across runners,
a worker killed mid-grid, one unit on the embedded SmolLM2, and clear errors (bad address, Ray missing)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import pytest
from conftest import NEEDS_SMOLLM2

from kvpress_like.cli import main
from kvpress_like.errors import ConfigError
from kvpress_like.eval import distributed
from kvpress_like.eval.distributed import ACTOR_PREFIX, DistributedError, RaySettings, ray_settings, run_grid_ray
from kvpress_like.eval.grid import parse_grid
from kvpress_like.eval.records import read_cells
from kvpress_like.eval.runner import pending_units, run_grid, run_unit
from kvpress_like.eval.summary import write_run_summary
from kvpress_like.eval.toy import byte_tokenizer, save_toy_model

TIMING = {"seconds", "timing", "prefill_seconds", "compress_seconds"}
SMALL = dict(name="small", tasks=["passkey", "multi_key"], lengths=[120, 200], samples=2, budgets=["25%", "50%"],
             methods=["full", "dapq", "snapkv"], threads=1)  # 16 units of ~0.03 s
LONG = dict(name="long", tasks=["passkey"], lengths=[6000], samples=6, budgets=["25%"], methods=["full", "dapq"],
            threads=1)  # 12 units of ~0.2 s: a worker killed after the first record dies mid-grid


@pytest.fixture(scope="module")
def ray_cluster():
    """A two-CPU Ray instance on loopback for this module, shut down after it."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             object_store_memory=80 * 2**20)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return str(save_toy_model(tmp_path_factory.mktemp("toy")))


def local_run(grid, tmp_path):
    """``grid`` run locally into ``tmp_path / "local"``: the reference every Ray run must reproduce."""
    out = tmp_path / "local"
    write_run_summary(grid, run_grid(grid, out, progress=False))
    return out


def without_timing(value):
    """A record with every timing field removed (timings differ between runs, nothing else may)."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def records_by_cell(out) -> dict[str, dict]:
    records = read_cells(out / "cells.jsonl")
    cells = [r["cell"] for r in records]
    assert len(cells) == len(set(cells)), "a cell was written twice"
    return {r["cell"]: without_timing(r) for r in records}


def summary_text(out) -> str:
    """``summary.md`` without what timing decides: its timing sentence, the cost column (measured prefill-time
    ratios), the cell-time section and the command that wrote it."""
    text = re.sub(r"^```bash\n.*?\n```\n\n", "", (out / "summary.md").read_text(), flags=re.M | re.S)
    text = re.sub(r"^## Cell time\n.*?(?=^## |\Z)", "", text, flags=re.M | re.S)
    text = re.sub(r"\| [\d.]+× \|$", "| <cost> |", text, flags=re.M)
    return re.sub(r"[\d.]+ s of cell time \([\d.]+ s per cell\)", "<timing>", text)


def test_ray_run_resumed_locally_equals_a_local_run(ray_cluster, toy_dir, tmp_path, capsys, single_threaded_torch):
    local = local_run(parse_grid({"model": toy_dir, **SMALL}), tmp_path)
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(json.dumps({"model": toy_dir, **SMALL}))  # JSON is YAML
    out = tmp_path / "ray"
    assert main(["ablate", str(grid_file), "--out", str(out), "--limit", "5", "--no-progress",
                 "--ray", "--ray-actors", "2"]) == 0  # `auto`: the cluster this process is connected to
    assert "5 run now" in capsys.readouterr().out
    assert len(read_cells(out / "cells.jsonl")) == 5
    assert main(["ablate", str(grid_file), "--out", str(out), "--no-progress"]) == 0  # resumed locally
    assert "11 run now" in capsys.readouterr().out
    assert records_by_cell(out) == records_by_cell(local)
    assert summary_text(out) == summary_text(local)


def test_killed_worker_is_replaced_and_no_record_is_lost_or_doubled(ray_cluster, toy_dir, tmp_path, caplog,
                                                                   single_threaded_torch):
    grid = parse_grid({"model": toy_dir, **LONG})
    local = local_run(grid, tmp_path)
    out = tmp_path / "faults"
    run_grid(grid, out, progress=False, limit=2)  # a local run stopped early: the Ray driver resumes it
    cells = out / "cells.jsonl"
    outcome: dict = {}

    def drive():
        try:
            outcome["summary"] = run_grid_ray(grid, out, RaySettings(actors=2), progress=False)
        except Exception as error:  # re-raised in the test's thread below
            outcome["error"] = error

    driver = threading.Thread(target=drive)
    driver.start()
    deadline = time.monotonic() + 40
    while len(read_cells(cells)) < 3 and time.monotonic() < deadline:  # workers are up and running units
        time.sleep(0.005)
    names = [n for n in ray_cluster.util.list_named_actors() if n.startswith(ACTOR_PREFIX)]
    written_at_kill = len(read_cells(cells))
    ray_cluster.kill(ray_cluster.get_actor(names[0]))
    driver.join(60)
    assert not driver.is_alive() and "error" not in outcome, outcome.get("error")
    assert written_at_kill < 12, "the grid ended before the kill: the test proves nothing"
    assert "running them again on a new worker" in caplog.text
    assert records_by_cell(out) == records_by_cell(local)
    assert outcome["summary"]["timing"]["cells"] == 12
    assert not [n for n in ray_cluster.util.list_named_actors() if n.startswith(ACTOR_PREFIX)]  # all stopped


def test_a_worker_that_cannot_load_the_model_stops_the_run_with_its_error(ray_cluster, tmp_path):
    grid = parse_grid({**SMALL, "model": str(tmp_path / "no-such-model"), "lengths": [120], "samples": 1})
    with pytest.raises(DistributedError, match=r"could not start.*no-such-model"):
        run_grid_ray(grid, tmp_path / "out", RaySettings(actors=1), tokenizer=byte_tokenizer(), progress=False)
    assert read_cells(tmp_path / "out" / "cells.jsonl") == []


@pytest.mark.model
@NEEDS_SMOLLM2
def test_one_unit_on_the_embedded_model(ray_cluster, smollm2, tmp_path):
    raw = {"name": "smol", "model": "smollm2-135m", "tasks": ["passkey"], "lengths": [200], "samples": 1,
           "protocols": ["question_aware"], "budgets": ["25%"], "methods": ["full", "dapq"], "threads": 1}
    grid = parse_grid(raw)
    summary = run_grid_ray(grid, tmp_path, RaySettings(actors=1), tokenizer=smollm2[1], progress=False)
    assert summary["timing"]["cells"] == 1
    (record,) = read_cells(tmp_path / "cells.jsonl")
    (unit,) = pending_units(grid, tmp_path / "fresh", smollm2[1])
    assert without_timing(record) == without_timing(run_unit(*smollm2, grid, unit))


def test_eval_with_ray_loads_only_the_tokenizer_and_passes_the_options(toy_dir, tmp_path, monkeypatch, capsys):
    from kvpress_like import cli

    def no_model(args):
        raise AssertionError("the driver of a Ray run must not load the model")

    def local_instead(grid, out, settings, tokenizer, **kwargs):  # the runner itself is tested above
        calls.append((settings, tokenizer))
        return write_run_summary(grid, run_grid(grid, out, progress=False))

    calls: list = []
    monkeypatch.setattr(cli, "_load", no_model)
    monkeypatch.setattr(distributed, "run_grid_ray", local_instead)
    assert main(["eval", "--model", toy_dir, "--length", "120", "--samples", "1", "--protocol", "question_aware",
                 "--out", str(tmp_path), "--no-progress", "--ray", "10.0.0.5:6379", "--ray-num-cpus", "2",
                 "--ray-num-gpus", "0.5"]) == 0
    ((settings, tokenizer),) = calls
    assert (settings.address, settings.num_cpus, settings.num_gpus) == ("10.0.0.5:6379", 2, 0.5)
    assert tokenizer is not None and "question_aware" in capsys.readouterr().out


def test_bad_ray_options_are_named_before_anything_runs(tmp_path):
    for address in ("http://head:8265", "head", "head:99999", "ray://"):
        with pytest.raises(ConfigError, match="not a Ray address"):
            ray_settings(address=address)
    with pytest.raises(ConfigError, match="num_gpus"):
        ray_settings(num_gpus=-1)
    with pytest.raises(ConfigError, match="set actors"):
        ray_settings(num_cpus=0)
    with pytest.raises(ConfigError, match="not a Ray address"):
        main(["ablate", str(tmp_path / "missing.yaml"), "--ray", "nowhere"])
    assert ray_settings(address="ray://10.0.0.5:10001").address == "ray://10.0.0.5:10001"


def test_missing_ray_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    grid = parse_grid({"name": "x"})
    with pytest.raises(DistributedError, match=re.escape('pip install ".[ray]"')):
        distributed.run_grid_ray(grid, tmp_path)


def test_the_core_does_not_import_ray():
    code = ("import sys, kvpress_like, kvpress_like.cli, kvpress_like.eval.runner, kvpress_like.eval.distributed; "
            "print('ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
