"""Cost of compression, measured as ratios within one run (no absolute claims, no timed asserts).

For each prompt length and method:

* **prefill ratio** — prefill + compression time of the method (one ``Pipeline.prefill``) divided by a
  plain uncompressed prefill of the same prompt; both are measured ``repeats`` times, interleaved, and
  the fastest runs are compared (noise on a busy machine only ever adds time), after one untimed prefill
  of each method (so that every repeat runs the model on the attention it keeps). Beside it, the median over
  the repeats of each run's ratio to the plain prefill of the same repeat: on a machine whose speed drifts
  between minutes, a pair run seconds apart shares the drift, so the median shows how far the fastest-of
  ratio can be trusted;
* **decode ms/token** — greedy decoding of ``decode_tokens`` tokens (EOS ignored) from the compressed
  cache and from the full cache, interleaved likewise, and their ratio (skipped with ``decode_tokens=0``);
* **cache bytes** — key/value bytes held after compression, their share of the full cache, and the most
  held at any moment of the prefill (the report's ``peak_cache_bytes``, deterministic);
* **peak memory** — the prefill's peak memory above the loaded model, each case (the plain prefill too)
  in a fresh process of its own (:mod:`kvpress_like.eval.memory`: peak resident set on CPU,
  ``torch.cuda.max_memory_allocated`` on CUDA).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from kvpress_like.eval.fixtures import bench_prompt, plain_prefill
from kvpress_like.eval.memory import PLAIN, measure_case
from kvpress_like.eval.protocols import greedy
from kvpress_like.eval.runner import progress_bar
from kvpress_like.prefill import shallow_copy


def _timed(fn) -> tuple[float, Any]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, value


def _decode_seconds(model, cache, logits, tokens: int) -> float | None:
    if not tokens:
        return None
    seconds, _ = _timed(lambda: greedy(model, shallow_copy(cache), logits, tokens, eos=set()))
    return seconds / tokens


def _ms(seconds: list[float | None]) -> float | None:
    measured = [s for s in seconds if s is not None]
    return 1000 * min(measured) if measured else None


def _peak(memory: dict[str, Any] | None, method: str, length: int, chunk_size: int | None,
          prompt_chunk: int | None = None) -> int | None:
    """Median peak over ``memory["repeats"]`` fresh processes (the allocator makes single runs noisy)."""
    if memory is None:
        return None
    peaks = [
        measure_case(memory["model"], method, length, memory["budget"], chunk_size, memory.get("threads"),
                     prompt_chunk)["peak_bytes"]
        for _ in range(memory.get("repeats", 1))
    ]
    return int(statistics.median(peaks))


def run_bench(
    model,
    tokenizer,
    methods: list[tuple[str, Any]],
    lengths: list[int],
    repeats: int = 3,
    decode_tokens: int = 32,
    memory: dict[str, Any] | None = None,
    progress: bool = True,
    chunk_size: int | None = None,
    prompt_chunk: int | None = None,
) -> dict[str, Any]:
    """Benchmark ``methods`` (``(registered name, pipeline)``) at each length; returns rows and run info.

    ``memory`` (``{"model": name, "budget": text, "threads": n, "repeats": r}``) measures each case's peak
    memory in ``r`` fresh processes (median); ``None`` skips it. ``chunk_size`` and ``prompt_chunk`` go to every
    method's :meth:`~kvpress_like.pipeline.Pipeline.prefill`.
    """
    rows = []
    total = len(lengths) * (1 + len(methods))
    bar = progress_bar(total, "bench", progress)
    for length in lengths:
        ids = bench_prompt(tokenizer, length).to(model.device)
        plain_prefill(model, ids[:, :64])  # warm-up
        for _, pipeline in methods:  # untimed: a prefill that prunes hands the model the attention later runs use
            pipeline.prefill(model, ids, chunk_size=chunk_size, prompt_chunk=prompt_chunk)
        plain_times, full_decode = [], []
        method_times: dict[str, list[float]] = {label: [] for label, _ in methods}
        method_decode: dict[str, list[float]] = {label: [] for label, _ in methods}
        results: dict[str, Any] = {}
        for _ in range(repeats):  # interleaved: plain, method 1, …, method k, then again
            seconds, (cache, logits) = _timed(lambda ids=ids: plain_prefill(model, ids))
            plain_times.append(seconds)
            full_decode.append(_decode_seconds(model, cache, logits, decode_tokens))
            full_bytes = cache.nbytes()
            del cache
            for label, pipeline in methods:
                seconds, result = _timed(
                    lambda p=pipeline, ids=ids: p.prefill(model, ids, chunk_size=chunk_size, prompt_chunk=prompt_chunk)
                )
                method_times[label].append(seconds)
                method_decode[label].append(
                    _decode_seconds(model, result.cache, result.next_token_logits, decode_tokens)
                )
                results[label] = result.report
                del result
        bar.update(1)
        plain_peak = _peak(memory, PLAIN, length, None)
        plain = min(plain_times)
        full_ms = _ms(full_decode)
        rows.append({
            "length": length, "method": "full (plain prefill)", "prefill_s": plain, "prefill_ratio": 1.0,
            "prefill_ratio_median": 1.0, "prefill_s_each": plain_times,
            "decode_ms_per_token": full_ms, "decode_ratio": 1.0 if full_ms else None, "cache_bytes": full_bytes,
            "cache_fraction": 1.0, "peak_cache_bytes": full_bytes, "peak_bytes": plain_peak,
            "peak_ratio": 1.0 if plain_peak else None, "budget_tokens": length,
        })
        for label, _ in methods:
            report = results[label]
            peak = _peak(memory, label, length, chunk_size, prompt_chunk)
            seconds = min(method_times[label])
            decode_ms = _ms(method_decode[label])
            paired = statistics.median(t / p for t, p in zip(method_times[label], plain_times, strict=True))
            rows.append({
                "length": length, "method": label, "prefill_s": seconds, "prefill_ratio": seconds / plain,
                "prefill_ratio_median": paired, "prefill_s_each": method_times[label],
                "decode_ms_per_token": decode_ms, "decode_ratio": decode_ms / full_ms if full_ms else None,
                "cache_bytes": report.cache_bytes_after, "cache_fraction": report.cache_bytes_after / full_bytes,
                "peak_cache_bytes": report.peak_cache_bytes, "peak_bytes": peak,
                "peak_ratio": peak / plain_peak if peak and plain_peak else None, "budget_tokens": report.budget,
            })
            bar.update(1)
    bar.close()
    return {
        "rows": rows,
        "settings": {
            "lengths": lengths, "repeats": repeats, "decode_tokens": decode_tokens, "methods": [m for m, _ in methods],
            "chunk_size": chunk_size, "prompt_chunk": prompt_chunk, "statistic": "fastest of the repeats",
            "memory_repeats": memory.get("repeats", 1) if memory else None,
        },
        "machine": {
            "platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": str(model.device), "dtype": str(next(model.parameters()).dtype),
        },
    }


def bench_markdown(result: dict[str, Any], model_name: str, command: str | None = None) -> str:
    s, m = result["settings"], result["machine"]
    lines = [
        f"# Benchmark: cost of compression on {model_name}", "",
        f"{m['device']}, {m['dtype']}, {m['threads']} threads, torch {m['torch']}; "
        f"fastest of {s['repeats']} interleaved "
        f"repeats; decode = {s['decode_tokens']} greedy tokens; chunk size {s.get('chunk_size') or 'none'}; "
        f"prompt chunk {s.get('prompt_chunk') or 'none (one forward)'}. "
        "Ratios are against the plain prefill / full-cache decode measured in the same run; peak = peak memory "
        f"above the loaded model, median of {s.get('memory_repeats') or 0} fresh processes per case.",
    ]
    if command:
        lines += ["", "```bash", command, "```"]
    paired = all("prefill_ratio_median" in r for r in result["rows"])  # records before it lack the column
    lines += ["", "| prompt | method | kept/head | prefill+compress (s) | ratio to plain prefill | "
              + ("median ratio per repeat | " if paired else "") + "decode ms/token | "
              "decode ratio | cache MiB | cache share | peak cache MiB | peak MiB | peak ratio |",
              "| ---: | --- | ---: | ---: | ---: | " + ("---: | " if paired else "")
              + "---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        median = f"{r['prefill_ratio_median']:.3f} | " if paired else ""
        lines.append(
            f"| {r['length']} | {r['method']} | {r['budget_tokens']} | {r['prefill_s']:.2f} | "
            f"{r['prefill_ratio']:.3f} | {median}{_cell(r['decode_ms_per_token'], '.1f')} | "
            f"{_cell(r['decode_ratio'], '.2f')} | {r['cache_bytes'] / 2**20:.1f} | {r['cache_fraction']:.3f} | "
            f"{_cell(r['peak_cache_bytes'], '.1f', 2**20)} | {_cell(r['peak_bytes'], '.0f', 2**20)} | "
            f"{_cell(r['peak_ratio'], '.2f')} |"
        )
    lines.append("")
    return "\n".join(lines)


def long_prompt_markdown(record: dict[str, Any], command: str | None = None) -> str:
    """The table of ``scripts/bench_long_prompt.py``'s record: each method's peak at the long length against the
    plain prefill at the short one."""
    s = record["settings"]
    plain, *methods = record["records"]
    lines = [
        "# Long prompts: every method at the long length against a plain prefill at the short one", "",
        f"Toy model ({', '.join(f'{k} {v}' for k, v in record['toy_model'].items())}); budget {s['budget']}; "
        "peak = peak memory above the loaded model, "
        f"median of {s['repeats']} fresh process(es) per case; plain prefill at {s['short']} tokens: "
        f"{plain['peak_bytes'] / 2**20:.0f} MiB peak, {plain['cache_bytes'] / 2**20:.0f} MiB cache.",
    ]
    if command:
        lines += ["", "```bash", command, "```"]
    lines += ["", f"| method at {s['long']} | prefill | peak MiB | × plain {s['short']} | peak cache MiB |",
              "| --- | --- | ---: | ---: | ---: |"]
    for r in methods:
        how = (f"progressive, prompt chunk {r['prompt_chunk']}" if r.get("prompt_chunk")
               else f"one pass, MLP chunk {r['chunk_size'] or 'none'}")
        lines.append(f"| {r['method']} | {how} | {r['peak_bytes'] / 2**20:.0f} | {r['ratio_to_short_plain']:.2f} | "
                     f"{_cell(r['peak_cache_bytes'], '.1f', 2**20)} |")
    return "\n".join([*lines, ""])


def batch_markdown(record: dict[str, Any], command: str | None = None) -> str:
    """The table of ``scripts/bench_eval_batch.py``'s record: samples per minute per run, and the ratio."""
    s = record["settings"]
    lines = [
        f"# Evaluation throughput: batch {s['batch_size']} against batch 1", "",
        f"{s['model']}, {s['samples']} samples of {s['length']} tokens, {record['torch_threads']} torch thread(s), "
        f"{s['rounds']} rounds alternating the batch sizes; same answers and errors in every round: "
        f"{record['same_answers']}.",
    ]
    if command:
        lines += ["", "```bash", command, "```"]
    lines += ["", "| round | batch size | samples | seconds | samples/min |", "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['round']} | {r['batch_size']} | {r['cells']} | {r['seconds']} | {r['samples_per_minute']} |"
              for r in record["runs"]]
    ratios = ", ".join(f"{ratio:.2f}" for ratio in record["ratios"])
    lines += ["", f"Batch {s['batch_size']} / batch 1, samples per minute: median {record['median_ratio']:.2f}× "
                  f"(rounds: {ratios})."]
    return "\n".join([*lines, ""])


def _cell(value: float | None, spec: str, scale: float = 1) -> str:
    return "–" if value is None else format(value / scale, spec)


def write_bench(result: dict[str, Any], out: str | Path, model_name: str, command: str | None = None) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(bench_markdown(result, model_name, command))
    return [out / "bench.json", out / "bench.md"]
