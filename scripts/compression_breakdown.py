"""Where a one-pass prefill's compression time goes: milliseconds per compressed layer, by stage.

Wraps the compressor's stages with timers (wall clock, inclusive: "scoring" contains the window's inputs,
queries and attention), runs ``--repeats`` prefills of a ``--length``-token prompt per method after one
warm-up, and prints the mean per layer. A diagnostic for the per-layer overhead that the benchmark's
ratios show at short prompts; run it on a quiet machine.

    OMP_WAIT_POLICY=PASSIVE python scripts/compression_breakdown.py --methods snapkv dapq --length 2048
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch

import kvpress_like.compressor as compressor
import kvpress_like.scorers.attention as attention
from kvpress_like.eval.fixtures import bench_prompt
from kvpress_like.eval.grid import MethodEntry, candidate
from kvpress_like.models import load_model

STAGES = [  # (owner, attribute, label), outermost last
    (compressor.LayerCompressor, "_window_queries", "window queries (tapped, else projected)"),
    (attention, "window_attention", "window attention (logits, mask, softmax)"),
    (attention, "pool_before_window", "pooling"),
    (compressor.LayerCompressor, "_scores", "scoring, all of it"),
    (compressor, "select_rows", "selection and gather"),
    (compressor.LayerCompressor, "_store", "writing the kept rows"),
    (compressor.LayerCompressor, "_report_layer", "report and observer hook"),
    (compressor.LayerCompressor, "_hook", "whole hook"),
]


def timed(function, label: str, spent: Counter):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - started

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=["snapkv", "dapq"])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--budget", default="10%")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    ids = bench_prompt(tokenizer, args.length)
    spent: Counter = Counter()
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in STAGES]
    try:
        for owner, name, label in STAGES:
            setattr(owner, name, timed(getattr(owner, name), label, spent))
        print(f"ms per compressed layer, mean of {args.repeats} prefills of {ids.shape[1]} tokens, "
              f"{args.threads} threads:")
        for method in args.methods:
            pipeline = candidate(MethodEntry(method=method), args.budget).pipeline
            with torch.no_grad():
                pipeline.prefill(model, ids)  # warm-up
                spent.clear()
                for _ in range(args.repeats):
                    layers = len(pipeline.prefill(model, ids).report.layers)
            print(f"\n{method}:")
            if not layers:
                print("  no layer compressed (the budget holds the prompt)")
                continue
            for _, _, label in STAGES:
                print(f"  {label:42s} {1000 * spent[label] / args.repeats / layers:7.3f}")
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)


if __name__ == "__main__":
    main()
