"""Cost of compression, measured as ratios within one run (no absolute claims, no timed asserts).

For each prompt length and method:

* **prefill ratio** — prefill + compression time of the method (one ``Pipeline.prefill``) divided by a
  plain uncompressed prefill of the same prompt; both are measured ``repeats`` times, interleaved, and
  the medians are compared (a busy machine slows both alike);
* **decode ms/token** — greedy decoding of ``decode_tokens`` tokens (EOS ignored) from the compressed
  cache and from the full cache, interleaved likewise, and their ratio;
* **cache bytes** — key/value bytes held after compression, and their share of the full cache;
* **peak memory** — the largest amount of tensor memory allocated at once during prefill +
  compression, above what was allocated before (on CUDA ``torch.cuda.max_memory_allocated``; on CPU
  the allocation trace of ``torch.profiler`` with ``profile_memory=True``, in a separate untimed run).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from kvpress_like.cache import CompressedCache
from kvpress_like.eval.haystack import haystack
from kvpress_like.eval.protocols import greedy
from kvpress_like.prefill import forward, shallow_copy
from kvpress_like.prompting import build_prompt


def bench_prompt(tokenizer, length: int, seed: int = 0) -> torch.Tensor:
    """A templated prompt of about ``length`` tokens of prose, cut to exactly ``length`` ids."""
    context = "\n\n".join(haystack(tokenizer, length + 512, seed))
    prompt = build_prompt(tokenizer, context, "Summarize the text above.")
    ids, cut = prompt.input_ids, prompt.context_length
    tail = ids.shape[1] - cut
    if cut < length - tail:
        raise ValueError(f"could only build a {ids.shape[1]}-token prompt for length {length}")
    return torch.cat([ids[:, : length - tail], ids[:, cut:]], dim=1)


def _timed(fn) -> tuple[float, Any]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, value


@torch.no_grad()
def plain_prefill(model, ids: torch.Tensor):
    cache = CompressedCache(model.config)
    logits = forward(model, cache, ids.to(model.device), torch.arange(ids.shape[1], device=model.device))
    return cache, logits


@torch.no_grad()
def peak_bytes(fn) -> int:
    """Peak tensor bytes allocated during ``fn()`` above the level at its start."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        ((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda item: item[0],
    )
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def _decode_seconds(model, cache, logits, start: int, tokens: int) -> float:
    seconds, _ = _timed(lambda: greedy(model, shallow_copy(cache), logits, start, tokens, eos=set()))
    return seconds / tokens


def run_bench(
    model,
    tokenizer,
    methods: list[tuple[str, Any]],
    lengths: list[int],
    repeats: int = 3,
    decode_tokens: int = 32,
    memory: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Benchmark ``methods`` (``(label, pipeline)``) at each length; returns rows and run info."""
    rows = []
    total = len(lengths) * (1 + len(methods))
    bar = _bar(total, progress)
    for length in lengths:
        ids = bench_prompt(tokenizer, length).to(model.device)
        plain_prefill(model, ids[:, :64])  # warm-up
        plain_times, full_decode = [], []
        method_times: dict[str, list[float]] = {label: [] for label, _ in methods}
        method_decode: dict[str, list[float]] = {label: [] for label, _ in methods}
        results: dict[str, Any] = {}
        for _ in range(repeats):  # interleaved: plain, method 1, …, method k, then again
            seconds, (cache, logits) = _timed(lambda ids=ids: plain_prefill(model, ids))
            plain_times.append(seconds)
            full_decode.append(_decode_seconds(model, cache, logits, length, decode_tokens))
            full_bytes = cache.nbytes()
            del cache
            for label, pipeline in methods:
                seconds, result = _timed(lambda p=pipeline, ids=ids: p.prefill(model, ids))
                method_times[label].append(seconds)
                method_decode[label].append(
                    _decode_seconds(model, result.cache, result.next_token_logits, length, decode_tokens)
                )
                results[label] = result.report
        bar.update(1)
        plain_peak = peak_bytes(lambda ids=ids: plain_prefill(model, ids)) if memory else None
        plain = statistics.median(plain_times)
        full_ms = 1000 * statistics.median(full_decode)
        rows.append({
            "length": length, "method": "full (plain prefill)", "prefill_s": plain, "prefill_ratio": 1.0,
            "decode_ms_per_token": full_ms, "decode_ratio": 1.0, "cache_bytes": full_bytes, "cache_fraction": 1.0,
            "peak_bytes": plain_peak, "peak_ratio": 1.0 if memory else None, "budget_tokens": length,
        })
        for label, pipeline in methods:
            report = results[label]
            peak = peak_bytes(lambda p=pipeline, ids=ids: p.prefill(model, ids)) if memory else None
            seconds = statistics.median(method_times[label])
            decode_ms = 1000 * statistics.median(method_decode[label])
            rows.append({
                "length": length, "method": label, "prefill_s": seconds, "prefill_ratio": seconds / plain,
                "decode_ms_per_token": decode_ms, "decode_ratio": decode_ms / full_ms,
                "cache_bytes": report.cache_bytes_after, "cache_fraction": report.cache_bytes_after / full_bytes,
                "peak_bytes": peak, "peak_ratio": peak / plain_peak if memory and plain_peak else None,
                "budget_tokens": report.budget,
            })
            bar.update(1)
    bar.close()
    return {
        "rows": rows,
        "settings": {
            "lengths": lengths, "repeats": repeats, "decode_tokens": decode_tokens, "methods": [m for m, _ in methods]
        },
        "machine": {
            "platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": str(model.device), "dtype": str(next(model.parameters()).dtype),
        },
    }


def _bar(total: int, enabled: bool):
    from kvpress_like.eval.runner import _progress

    return _progress(total, "bench", enabled)


def bench_markdown(result: dict[str, Any], model_name: str, command: str | None = None) -> str:
    s, m = result["settings"], result["machine"]
    lines = [
        f"# Benchmark: cost of compression on {model_name}", "",
        f"{m['device']}, {m['dtype']}, {m['threads']} threads, torch {m['torch']}; "
        f"medians of {s['repeats']} interleaved "
        f"repeats; decode = {s['decode_tokens']} greedy tokens. Ratios are against the plain prefill / full-cache "
        "decode measured in the same run.",
    ]
    if command:
        lines += ["", "```bash", command, "```"]
    lines += ["", "| prompt | method | kept/head | prefill+compress (s) | ratio to plain prefill | decode ms/token | "
              "decode ratio | cache MiB | cache share | peak MiB | peak ratio |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        peak = "–" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        peak_ratio = "–" if r["peak_ratio"] is None else f"{r['peak_ratio']:.2f}"
        lines.append(
            f"| {r['length']} | {r['method']} | {r['budget_tokens']} | {r['prefill_s']:.2f} | "
            f"{r['prefill_ratio']:.3f} | "
            f"{r['decode_ms_per_token']:.1f} | {r['decode_ratio']:.2f} | {r['cache_bytes'] / 2**20:.1f} | "
            f"{r['cache_fraction']:.3f} | {peak} | {peak_ratio} |"
        )
    lines.append("")
    return "\n".join(lines)


def write_bench(result: dict[str, Any], out: str | Path, model_name: str, command: str | None = None) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(bench_markdown(result, model_name, command))
    return [out / "bench.json", out / "bench.md"]
