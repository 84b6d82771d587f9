"""Why does faithful DapQ lose on SmolLM2? Which prompt tokens each window keeps, layer by layer.

For single-needle samples (question-aware protocol) this prints, per method and budget: the share of
(layer, KV head) pairs that keep all five needle digits, the share of digits kept, how much of the
question, of the chat template's tail and of the first 4 tokens survive, and — for the pseudo-query
windows — the share of their score mass that lands on the prompt positions their own content was
copied from (first 4 + last 28 tokens). A per-layer table shows where DapQ and SnapKV part ways.

    .venv/bin/python scripts/diagnose_dapq.py --samples 10 --length 1024 > docs/results/research/diagnosis.md
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from kvpress_like import build, hookimpl, prefill_many, register_plugin
from kvpress_like.eval.tasks import single_needle
from kvpress_like.models import load_model
from kvpress_like.prompting import build_prompt
from kvpress_like.scorers.attention import AttentionScorer

SCORES: dict[tuple[str, int], torch.Tensor] = {}


class RecordedAttention(AttentionScorer):
    """The attention scorer, keeping each layer's scores for this script."""

    name = "recorded_attention"

    def score(self, ctx):
        scores = super().score(ctx)
        SCORES[(self.tag, ctx.layer_idx)] = scores.detach().float().cpu()
        return scores


class Plugin:
    @hookimpl
    def register_scorers(self):
        return [RecordedAttention]


SETTINGS = {  # label -> (method, overrides)
    "dapq": ("dapq", {}),
    "semantic": ("dapq", {"window": "semantic"}),
    "snapkv": ("snapkv", {}),
    "dapq_chunk": ("dapq_chunk", {}),
    "dapq_plus": ("dapq_plus", {}),
}


def recorded(label: str, budget: str):
    method, overrides = SETTINGS[label]
    pipeline = build(method, budget=budget, **overrides)
    options = pipeline.scorer.config.model_dump()
    pipeline = build(method, budget=budget, **overrides, scorer={"name": "recorded_attention", **options})
    pipeline.scorer.tag = f"{label}@{budget}"
    return pipeline


def find(ids: list[int], pattern: list[int]) -> int:
    for start in range(len(ids) - len(pattern) + 1):
        if ids[start : start + len(pattern)] == pattern:
            return start
    raise ValueError("needle digits not found in the prompt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--budgets", nargs="+", default=["10%", "20%"])
    args = parser.parse_args()
    torch.manual_seed(0)
    register_plugin(Plugin())
    model, tokenizer = load_model("smollm2-135m")
    depths = [0.1, 0.3, 0.5, 0.7, 0.9]
    totals: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    per_layer: dict[tuple[str, str], torch.Tensor] = {}
    for index in range(args.samples):
        sample = single_needle(tokenizer, args.length, depths[index % len(depths)], seed=1000 + index)
        prompt = build_prompt(tokenizer, sample.context, sample.question)
        ids = prompt.input_ids
        digits = tokenizer.encode(sample.answers[0], add_special_tokens=False)
        start = find(ids[0].tolist(), digits)
        needle = torch.arange(start, start + len(digits))
        q_start, q_end = prompt.question_span
        length = ids.shape[1]
        regions = {
            "question": torch.arange(q_start, q_end),
            "template tail": torch.arange(q_end, length),
            "first 4": torch.arange(4),
        }
        copies = torch.cat([torch.arange(4), torch.arange(length - 28, length)])
        pipelines = {(label, b): recorded(label, b) for b in args.budgets for label in SETTINGS}
        results = prefill_many(model, ids, list(pipelines.values()), question_span=prompt.question_span)
        for (label, budget), result in zip(pipelines, results, strict=True):
            stats = totals[(label, budget)]
            layer_all = []
            for layer_idx, layer in result.report.layers.items():
                mask = layer.kept_mask(length)[0]  # [heads, L]
                kept_digits = mask[:, needle]
                layer_all.append(kept_digits.all(dim=-1).float().mean())
                stats["all digits kept"] += float(kept_digits.all(dim=-1).float().mean())
                stats["digits kept"] += float(kept_digits.float().mean())
                for name, positions in regions.items():
                    stats[name] += float(mask[:, positions].float().mean())
                scores = SCORES.get((f"{label}@{budget}", layer_idx))
                if scores is not None and label in ("dapq", "semantic", "dapq_chunk", "dapq_plus"):
                    share = scores[0][:, copies].sum() / scores[0].sum()
                    stats["score mass on own copies"] += float(share)
                    stats["copies' share of positions"] += len(copies) / length
                stats["layers"] += 1
            per_layer[(label, budget)] = per_layer.get((label, budget), 0) + torch.stack(layer_all)
    print(f"# DapQ diagnosis on SmolLM2-135M ({args.samples} single-needle samples, ~{args.length} tokens, "
          "question-aware)\n")
    print("```bash\n.venv/bin/python scripts/diagnose_dapq.py " + " ".join(
        [f"--samples {args.samples}", f"--length {args.length}", "--budgets", *args.budgets]) + "\n```\n")
    keys = ["all digits kept", "digits kept", "question", "template tail", "first 4", "score mass on own copies",
            "copies' share of positions"]
    print("Shares in %, averaged over samples, layers and KV heads (a needle is five digit tokens).\n")
    print("| method | budget | " + " | ".join(keys) + " |")
    print("| --- | --- |" + " ---: |" * len(keys))
    for (label, budget), stats in totals.items():
        n = stats["layers"]
        cells = [f"{100 * stats[k] / n:.1f}" if stats.get(k) else "—" for k in keys]
        print(f"| {label} | {budget} | " + " | ".join(cells) + " |")
    for budget in args.budgets:
        print(f"\n**Share of KV heads keeping all needle digits, per layer, budget {budget}** (%)\n")
        labels = list(SETTINGS)
        print("| layer | " + " | ".join(labels) + " |")
        print("| ---: |" + " ---: |" * len(labels))
        for layer in range(model.config.num_hidden_layers):
            row = [f"{100 * float(per_layer[(label, budget)][layer]) / args.samples:.0f}" for label in labels]
            print(f"| {layer} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
