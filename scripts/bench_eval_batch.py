"""Evaluation throughput with batched samples: samples per minute at ``--batch-size`` 1 and N, in one run.

The same grid (the embedded SmolLM2-135M by default) runs into fresh folders, alternating the batch sizes
``--rounds`` times so that a busy machine slows both alike. Every round checks that the batched records
equal the one-by-one records (answers and errors; the harness's tests check the metrics). Prints one
line per run and the median throughput ratio, and writes the records as JSON.

    python scripts/bench_eval_batch.py --out docs/results/bench-batch
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvpress_like.eval.bench import batch_markdown
from kvpress_like.eval.grid import parse_grid
from kvpress_like.eval.records import read_cells
from kvpress_like.eval.runner import run_grid
from kvpress_like.models import load_model

GRID = {"name": "bench-batch", "tasks": ["single_needle"], "lengths": [1024], "samples": 8,
        "protocols": ["question_aware"], "budgets": ["10%", "20%"], "methods": ["full", "snapkv", "dapq", "pyramidkv"]}


def answers(folder: Path) -> dict[str, list]:
    """Per cell, the reference answer and every row's (label, budget, answer, error)."""
    return {r["cell"]: [r["reference"]["answer"]] + [(x["label"], x["budget"], x.get("answer"), x["error"])
                                                     for x in r["rows"]] for r in read_cells(folder / "cells.jsonl")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--samples", type=int, default=GRID["samples"])
    parser.add_argument("--length", type=int, default=GRID["lengths"][0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    grid = parse_grid({**GRID, "model": args.model, "samples": args.samples, "lengths": [args.length]})
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            for size in (1, args.batch_size) if round_ % 2 == 0 else (args.batch_size, 1):
                out = Path(folder) / f"round{round_}-batch{size}"
                started = time.perf_counter()
                run_grid(grid.model_copy(update={"batch_size": size}), out, model, tokenizer, progress=False)
                seconds = time.perf_counter() - started
                cells = len(read_cells(out / "cells.jsonl"))
                runs.append({"round": round_, "batch_size": size, "seconds": round(seconds, 2), "cells": cells,
                             "samples_per_minute": round(60 * cells / seconds, 2), "answers": answers(out)})
                print(f"round {round_} batch {size}: {cells} samples in {seconds:.1f} s = "
                      f"{runs[-1]['samples_per_minute']:.2f} samples/min", flush=True)
    one = [r for r in runs if r["batch_size"] == 1]
    many = [r for r in runs if r["batch_size"] == args.batch_size]
    same = all(a["answers"] == b["answers"] for a, b in zip(one, many, strict=True))
    ratios = [b["samples_per_minute"] / a["samples_per_minute"] for a, b in zip(one, many, strict=True)]
    print(f"batch {args.batch_size} vs 1: {statistics.median(ratios):.2f}x samples/min (rounds: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}); same answers and errors: {same}")
    args.out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        del run["answers"]
    record = {
        "grid": grid.model_dump(mode="json"), "settings": vars(args) | {"out": str(args.out)},
        "torch_threads": torch.get_num_threads(), "runs": runs, "ratios": ratios,
        "median_ratio": statistics.median(ratios), "same_answers": same,
    }
    (args.out / "bench_batch.json").write_text(json.dumps(record, indent=2))
    (args.out / "bench_batch.md").write_text(batch_markdown(record, shlex.join(["python", *sys.argv])))


if __name__ == "__main__":
    main()
