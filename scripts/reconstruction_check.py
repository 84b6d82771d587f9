"""Can the model do what KVzip asks of it? Teacher-forced accuracy of its context reconstruction.

KVzip (Kim et al. 2025, arXiv 2505.23416) scores a key by the attention it gets while the model repeats the
context. This runs a grid's ``kvzip`` window (its reconstruction ids and positions) after each sample's
compressed part with the full cache, and prints how often the model's greedy next token is the next
reconstruction token: over every reconstruction row (every ``--stride``-th, to bound the vocabulary
projections) and over the rows that must produce the needle's tokens. A model that repeats the context well
gives KVzip's scores their meaning; one that does not gives attention that need not point at what it drops.

    python scripts/reconstruction_check.py docs/results/grids/gemma-kvzip-4k.yaml --samples 5
"""

from __future__ import annotations

import argparse

import torch

from kvpress_like.eval.grid import candidate, grid_samples, load_grid
from kvpress_like.eval.protocols import prepare
from kvpress_like.eval.tasks import answer_positions
from kvpress_like.models import load_model


@torch.no_grad()
def predicted_next(model, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Greedy next token of ``rows`` of the sequence ``ids`` ``[1, T]`` run at ``positions`` with the full cache."""
    hidden = model.model(input_ids=ids, position_ids=positions).last_hidden_state[0]
    return torch.cat([model.lm_head(hidden[part]).argmax(dim=-1) for part in rows.split(256)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid")
    parser.add_argument("--method", default="kvzip", help="label of the grid's KVzip entry")
    parser.add_argument("--samples", type=int, default=5, help="first samples of each task and length")
    parser.add_argument("--stride", type=int, default=4, help="every stride-th reconstruction row is checked")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = load_grid(args.grid)
    model, tokenizer = load_model(grid.model)
    entry = next((e for e in grid.methods if e.name == args.method), None)
    if entry is None:
        labels = [e.name for e in grid.methods]
        parser.error(f"no method labelled {args.method!r} in the grid; its methods are {labels}")
    window = candidate(entry, "10%").pipeline.window  # any budget: only the window is used
    overall, needle = [], []
    for task, length, index, sample in grid_samples(grid, tokenizer):
        if index >= args.samples:
            continue
        prompt = prepare(tokenizer, sample, grid.protocols[0])
        context = prompt.input_ids[:, : prompt.compress_length]
        plan = window.plan(context)
        appended, length_ = plan.appended_ids, context.shape[1]
        ids = torch.cat([context, appended], dim=1)
        positions = torch.cat([torch.arange(length_)[None], plan.appended_positions], dim=1)
        targets = appended[0, 1:]  # row L + i predicts appended id i + 1
        digits = torch.tensor(answer_positions(appended[0].tolist(), tokenizer, sample.answers[0])) - 1
        checked = torch.unique(torch.cat([torch.arange(0, targets.shape[0], args.stride), digits]))
        got = predicted_next(model, ids, positions, length_ + checked) == targets[checked]
        hits = dict(zip(checked.tolist(), got.tolist(), strict=True))
        strided = [hits[i] for i in range(0, targets.shape[0], args.stride)]
        overall.append(sum(strided) / len(strided))
        needle.append(sum(hits[i] for i in digits.tolist()) / len(digits))
        print(f"{task} {length} #{index}: reconstruction {overall[-1]:.3f} ({len(strided)} rows), "
              f"needle's tokens {needle[-1]:.2f} ({len(digits)})", flush=True)
    print(f"\nmean over {len(overall)} samples: reconstruction rows predicted {sum(overall) / len(overall):.3f}, "
          f"needle's tokens {sum(needle) / len(needle):.3f}")


if __name__ == "__main__":
    main()
