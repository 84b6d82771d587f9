"""``kvpress-like demo``: a needle in ~1.5k tokens of prose, answered with and without compression."""

from __future__ import annotations

import time

from kvpress_like.eval.tasks import single_needle
from kvpress_like.factory import build
from kvpress_like.models import load_model

DEMO_SETTINGS = (
    ("full cache", "dapq", "100%", {}),
    ("DapQ", "dapq", "75%", {}),
    ("DapQ", "dapq", "50%", {}),
    ("DapQ", "dapq", "25%", {}),
    ("semantic-only ablation", "dapq", "75%", {"window": "semantic"}),
    ("semantic-only ablation", "dapq", "50%", {"window": "semantic"}),
    ("semantic-only ablation", "dapq", "25%", {"window": "semantic"}),
    ("dapq_plus (DapQ + SnapKV window, chunks)", "dapq_plus", "25%", {}),
    ("dapq_plus (DapQ + SnapKV window, chunks)", "dapq_plus", "10%", {}),
)


def run_demo(model_name: str = "smollm2-135m", context_tokens: int = 1500, depth: float = 0.5, seed: int = 3) -> str:
    """Run every demo setting on one needle sample and return a Markdown table."""
    model, tokenizer = load_model(model_name)
    sample = single_needle(tokenizer, context_tokens, depth, seed)
    rows = [
        "| setting | budget | kept tokens per KV head | cache MiB | correct | answer | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, method, budget, overrides in DEMO_SETTINGS:
        pipeline = build(method, budget=budget, **overrides)
        started = time.perf_counter()
        answer = pipeline.generate(model, tokenizer, sample.context, sample.question, max_new_tokens=24)
        report = pipeline.last_report
        rows.append(
            f"| {label} | {budget} | {report.budget} of {report.prompt_length} | "
            f"{report.cache_bytes_after / 2**20:.1f} | {'yes' if sample.is_correct(answer) else 'no'} | "
            f"{answer.strip().splitlines()[0] if answer.strip() else ''!s} | {time.perf_counter() - started:.1f} |"
        )
    header = f"Needle {sample.answers[0]!r} at depth {depth:.0%} of ~{context_tokens} tokens of prose ({model_name})."
    return header + "\n\n" + "\n".join(rows)
