"""Does a method keep the needle? The share of the answer's tokens each compressed layer keeps, per method.

Builds a grid's samples (its tasks, lengths, seed and depths), compresses each sample's compressed part
(the whole prompt question-aware, the context query-agnostic) with each of the grid's methods at one
budget, and prints per method the mean over samples of the share of answer tokens kept in each
compressed layer, and in how many samples every compressed layer kept every answer token. Answers lost
with the needle kept were lost while reading; answers lost with the needle evicted, by the scorer.
A diagnostic for the results pages (KVzip on Gemma, docs/results/gemma-long.md).

    python scripts/needle_kept.py docs/results/grids/gemma-kvzip-4k.yaml --samples 5 --budget 10%
"""

from __future__ import annotations

import argparse

import torch

from kvpress_like.eval.grid import candidate, grid_samples, load_grid
from kvpress_like.eval.protocols import prepare
from kvpress_like.eval.tasks import answer_positions
from kvpress_like.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid")
    parser.add_argument("--samples", type=int, default=5, help="first samples of each task and length")
    parser.add_argument("--budget", default="10%")
    parser.add_argument("--methods", nargs="+", help="labels of the grid's methods to run (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = load_grid(args.grid)
    model, tokenizer = load_model(grid.model)
    protocol = grid.protocols[0]
    entries = [e for e in grid.methods if e.takes_budget and (not args.methods or e.name in args.methods)]
    if args.methods and len(entries) < len(args.methods):
        known = [e.name for e in grid.methods if e.takes_budget]
        parser.error(f"--methods {args.methods} are not all in the grid; its methods with a budget are {known}")
    samples = [s for s in grid_samples(grid, tokenizer) if s[2] < args.samples]
    pipelines = {e.name: candidate(e, args.budget).pipeline for e in entries}
    shares: dict[str, list[torch.Tensor]] = {name: [] for name in pipelines}
    for task, length, index, sample in samples:
        prompt = prepare(tokenizer, sample, protocol)
        ids = prompt.input_ids[:, : prompt.compress_length]
        needle = torch.tensor(answer_positions(ids[0].tolist(), tokenizer, sample.answers[0]))
        for name, pipeline in pipelines.items():
            with torch.no_grad():
                report = pipeline.prefill(model, ids, question_span=prompt.question_span).report
            layers = sorted(report.layers)
            kept = torch.stack([report.layers[i].kept_mask(ids.shape[1])[0, :, needle].float().mean() for i in layers])
            shares[name].append(kept)
            print(f"{task} {length} #{index} {name}: {', '.join(f'{v:.2f}' for v in kept.tolist())}", flush=True)
    print(f"\nshare of the answer's tokens kept per compressed layer ({protocol}, budget {args.budget}, "
          f"{len(samples)} samples); 'all' = samples with every answer token kept in every compressed layer")
    for name, rows in shares.items():
        table = torch.stack(rows)
        whole = int((table == 1).all(dim=1).sum())
        means = ", ".join(f"{v:.2f}" for v in table.mean(dim=0).tolist())
        print(f"  {name:14s} mean {means}   all {whole}/{len(rows)}")


if __name__ == "__main__":
    main()
