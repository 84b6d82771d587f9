"""Peak memory of one prefill, measured in a fresh process per case.

A process of its own loads the model, warms it up on a short prompt, and then runs exactly one prefill
(plain, or a method's compressed prefill). On CPU the peak resident set (``VmHWM``) is reset after
the warm-up (``/proc/self/clear_refs``) and read after the prefill; what it grew above the resident set
of the loaded, warmed-up model is the prefill's peak. On CUDA it is ``torch.cuda.max_memory_allocated``
above the allocation before the prefill. Memory freed by one case never hides another case's peak,
because no two cases share a process.

On CPU the child runs with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``). By default
glibc raises that threshold after large frees and then serves tensors of up to 32 MiB from its heap, where
freed buffers stay resident: the peak then counts memory that is free but not returned, and repeated runs of
one case differed by up to 2× (138 and 268 MiB). With the threshold fixed, every tensor of 64 KiB or more is
mapped on allocation and unmapped on free, so the resident set follows the live tensors (as
``max_memory_allocated`` does on CUDA) and repeated runs agree to the MiB.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

PLAIN = "plain"
MMAP_THRESHOLD = 64 * 1024  # bytes: allocations this large are mmapped, so freed tensors leave the resident set


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line: peak memory needs Linux")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set


def _rss_description() -> str:
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    allocator = f"glibc mmap threshold {threshold} bytes" if threshold else "glibc's default (dynamic) mmap threshold"
    return f"peak resident set (VmHWM) above the loaded model, {allocator}"


def run_case(model_name: str, method: str, length: int, budget: str, chunk_size: int | None, threads: int | None,
             prompt_chunk: int | None = None):
    """This process's measurement of one case (call it in a fresh process: see :func:`measure_case`)."""
    import torch

    from kvpress_like.eval.fixtures import bench_prompt, plain_prefill
    from kvpress_like.eval.grid import MethodEntry, candidate
    from kvpress_like.models import load_model

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_model(model_name)
    ids = bench_prompt(tokenizer, length).to(model.device)
    # `full` (it takes no budget): our prefill, nothing dropped
    pipeline = None if method == PLAIN else candidate(MethodEntry(method=method), budget).pipeline

    def prefill():
        if pipeline is None:
            return plain_prefill(model, ids)[0].nbytes(), None
        report = pipeline.prefill(model, ids, chunk_size=chunk_size, prompt_chunk=prompt_chunk).report
        return report.cache_bytes_after, report.peak_cache_bytes

    with torch.no_grad():
        plain_prefill(model, ids[:, :64])  # warm-up: kernels, allocator pools
        gc.collect()
        cuda = model.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = _status_kib("VmRSS") * 1024
            _reset_peak_rss()
        held, peak_cache = prefill()
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = _status_kib("VmHWM") * 1024 - base
    return {
        "method": method, "length": length, "budget": budget, "chunk_size": chunk_size, "prompt_chunk": prompt_chunk,
        "peak_bytes": peak, "cache_bytes": held, "peak_cache_bytes": peak_cache,
        "measured": "cuda max_memory_allocated" if cuda else _rss_description(),
    }


def measure_case(
    model_name: str, method: str, length: int, budget: str, chunk_size: int | None = None, threads: int | None = None,
    prompt_chunk: int | None = None,
) -> dict[str, Any]:
    """Run :func:`run_case` in a fresh Python process and return its record."""
    command = [sys.executable, "-m", "kvpress_like.eval.memory", "--model", model_name, "--method", method,
               "--length", str(length), "--budget", budget]
    if chunk_size:
        command += ["--chunk-size", str(chunk_size)]
    if threads:
        command += ["--threads", str(threads)]
    if prompt_chunk:
        command += ["--prompt-chunk", str(prompt_chunk)]
    env = {**os.environ, "TQDM_DISABLE": "1", "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory case {method} at {length} tokens failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", required=True, help=f"a registered method, or {PLAIN!r} for no compression")
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--budget", default="10%")
    parser.add_argument("--chunk-size", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--prompt-chunk", type=int, help="progressive prefill: prompt chunks of this many tokens")
    args = parser.parse_args(argv)
    record = run_case(args.model, args.method, args.length, args.budget, args.chunk_size, args.threads,
                      args.prompt_chunk)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
