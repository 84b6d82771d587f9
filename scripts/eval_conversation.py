"""A conversation that goes on: a needle context, a long teacher-forced continuation, then the question.

Each sample is a single-needle context (``kvpress_like.eval.tasks.single_needle``) prefilled and compressed to the
schedule's target, then ``--continuation`` tokens of other prose fed as if generated (teacher-forced, ``--chunk``
tokens per forward, so every configuration sees the same tokens; a decode schedule compresses after each chunk
whenever a layer holds target + interval rows), then the question and the answer's opening, then a greedy answer.
Without compression the cache holds everything; with it, the needle must survive every decode-time event.
Records go to ``OUT/conversation.jsonl`` (one line per sample and configuration; a rerun resumes) and the table
to ``OUT/conversation.md`` (``--render`` re-renders it from the records): correct answers per configuration,
Wilson 95 % intervals, and paired counts against the best configuration of the same target.

    OMP_WAIT_POLICY=PASSIVE python scripts/eval_conversation.py --samples 16 --out docs/results/conversation
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
from pathlib import Path

import torch

from kvpress_like import build
from kvpress_like.decoding import GenerationOptions, decode_batch
from kvpress_like.eval.haystack import haystack
from kvpress_like.eval.metrics import wilson_interval
from kvpress_like.eval.tasks import single_needle
from kvpress_like.prefill import feed
from kvpress_like.prompting import answer_opening, build_prompt

WINDOWS = {"streaming_llm": "none", "snapkv": "recent", "dapq_reaimed": "reaimed", "dapq": "pseudo"}
LABELS = {"none": "sinks + recent (StreamingLLM)", "recent": "recent queries (SnapKV-D)",
          "reaimed": "re-aimed queries (DapQ-D, no extra forward)", "pseudo": "pseudo queries (DapQ-D, faithful)"}
FULL = "full cache"
SEED_OFFSET = 70_000  # disjoint from the seeds of every other evaluation in docs/results


def configurations(targets: list[int], ratios: list[float], interval: int) -> dict[str, dict | None]:
    configs: dict[str, dict | None] = {FULL: None}
    sizes = [("target", t) for t in targets] + [("ratio", r) for r in ratios]
    for kind, size in sizes:
        for method, window in WINDOWS.items():
            name = f"{kind} {size}: {LABELS[window]}"
            configs[name] = {"method": method, "decoding": {kind: size, "interval": interval, "window": window,
                                                            "window_size": 32}, "size": f"{kind} {size}"}
    return configs


def sample_ids(tokenizer, seed: int, context: int, continuation: int) -> tuple[torch.Tensor, int, int, object]:
    """``(ids, prefill_end, question_start, sample)``: prompt ids with the continuation between the needle context
    and the question, then the answer's opening."""
    rng = random.Random(seed)
    sample = single_needle(tokenizer, context, rng.choice([0.1, 0.3, 0.5, 0.7, 0.9]), seed)
    prose = "\n\n".join(haystack(tokenizer, continuation, seed + 1))
    prompt = build_prompt(tokenizer, sample.context + "\n\n" + prose, sample.question)
    prefill_end = build_prompt(tokenizer, sample.context).input_ids.shape[1]
    opening = tokenizer.encode(answer_opening(tokenizer, sample.meta["answer_prefix"]), add_special_tokens=False)
    ids = torch.cat([prompt.input_ids, torch.tensor([opening])], dim=1)
    return ids, prefill_end, prompt.context_length, sample


@torch.no_grad()
def answer(model, tokenizer, config: dict | None, ids: torch.Tensor, prefill_end: int, question_start: int,
           chunk: int, max_new_tokens: int) -> tuple[str, dict]:
    pipeline = build("full") if config is None else build(config["method"], budget=_budget(config),
                                                         decoding=config["decoding"])
    result = pipeline.prefill(model, ids[:, :prefill_end])
    cache = result.cache
    for start in range(prefill_end, question_start, chunk):
        if cache.decoding is not None:
            cache.decoding.between_steps(model, cache)
        feed(model, cache, ids[:, start : min(start + chunk, question_start)])
    if cache.decoding is not None:
        cache.decoding.between_steps(model, cache)
    logits = feed(model, cache, ids[:, question_start:])
    tokens = decode_batch(model, cache, logits, max_new_tokens, GenerationOptions(), {tokenizer.eos_token_id})[0]
    rows = max(cache.physical_length(i) for i in range(len(cache.layers)))
    decoding = result.report.decoding
    return tokenizer.decode(tokens, skip_special_tokens=True), {
        "final_rows": rows, "logical_length": cache.get_seq_length(),
        "events": 0 if decoding is None else len(decoding.event_steps)}


def _budget(config: dict) -> int | float:
    decoding = config["decoding"]
    return decoding["target"] if "target" in decoding else decoding["ratio"]


def markdown(records: list[dict], settings: dict, command: str) -> str:
    by_config: dict[str, dict[int, dict]] = {}
    for record in records:
        by_config.setdefault(record["config"], {})[record["seed"]] = record
    seeds = sorted(set.intersection(*(set(rows) for rows in by_config.values())))
    lines = [
        "# A conversation that goes on: the needle after a long continuation (SmolLM2-135M)",
        "",
        f"{len(seeds)} samples: a single-needle context of about {settings['context']} tokens prefilled and "
        f"compressed, then {settings['continuation']} tokens of other prose fed teacher-forced in chunks of "
        f"{settings['chunk']} (a decode schedule compresses whenever a layer holds target + {settings['interval']} "
        "rows), then the question; greedy answer. Paired counts compare each configuration with the full cache "
        "(answers only it got right – answers only the full cache got right).",
        "",
        "```bash",
        command,
        "```",
        "",
        "| configuration | correct | share | Wilson 95 % | vs full cache | share of full's answers | final rows |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    full = by_config.get(FULL, {})
    full_right = sum(full[s]["correct"] for s in seeds) if full else 0
    for name, rows in by_config.items():
        right = [rows[s]["correct"] for s in seeds]
        low, high = wilson_interval(sum(right), len(right))
        paired = "–"
        kept = "–"
        if full and name != FULL:
            wins = sum(rows[s]["correct"] and not full[s]["correct"] for s in seeds)
            losses = sum(full[s]["correct"] and not rows[s]["correct"] for s in seeds)
            paired = f"{wins}–{losses}"
            both = sum(rows[s]["correct"] and full[s]["correct"] for s in seeds)
            kept = f"{100 * both / full_right:.0f} %" if full_right else "–"
        final = max(rows[s]["final_rows"] for s in seeds)
        lines.append(f"| {name} | {sum(right)}/{len(right)} | {100 * sum(right) / len(right):.0f} % | "
                     f"{100 * low:.0f}–{100 * high:.0f} % | {paired} | {kept} | {final} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--continuation", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=32, help="continuation tokens per forward")
    parser.add_argument("--interval", type=int, default=64)
    parser.add_argument("--targets", type=int, nargs="*", default=[256, 512])
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.25])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--render", action="store_true", help="only re-render OUT/conversation.md")
    args = parser.parse_args()
    records_path, settings_path = args.out / "conversation.jsonl", args.out / "settings.json"
    if args.render:
        saved = json.loads(settings_path.read_text())
        records = [json.loads(line) for line in records_path.read_text().splitlines()]
        (args.out / "conversation.md").write_text(markdown(records, saved["settings"], saved["command"]))
        return
    from kvpress_like.models import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m")
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "render")}
    command = shlex.join(["python", *sys.argv])
    settings_path.write_text(json.dumps({"settings": settings, "command": command}, indent=1))
    done = set()
    if records_path.exists():
        done = {(r["config"], r["seed"]) for r in map(json.loads, records_path.read_text().splitlines())}
    configs = configurations(args.targets, args.ratios, args.interval)
    with records_path.open("a") as out:
        for k in range(args.samples):
            seed = SEED_OFFSET + k
            ids, prefill_end, question_start, sample = sample_ids(tokenizer, seed, args.context, args.continuation)
            for name, config in configs.items():
                if (name, seed) in done:
                    continue
                text, facts = answer(model, tokenizer, config, ids, prefill_end, question_start, args.chunk,
                                     sample.meta["max_new_tokens"])
                record = {"config": name, "seed": seed, "answer": text, "expected": sample.answers,
                          "correct": sample.is_correct(text), "prompt_tokens": ids.shape[1], **facts}
                out.write(json.dumps(record) + "\n")
                out.flush()
                print(name, seed, record["correct"], repr(text), facts, flush=True)
    records = [json.loads(line) for line in records_path.read_text().splitlines()]
    (args.out / "conversation.md").write_text(markdown(records, settings, command))


if __name__ == "__main__":
    main()
