"""Generation under a decode schedule: step time, tokens/s, cache rows and event cost beside the full cache.

Prefills a ``--length``-token prompt once per configuration, then generates ``--tokens`` greedy tokens one step
at a time (end of sequence ignored), timing every step. The full cache (method ``full``) is the reference; each
scheduled configuration compresses the prompt to ``--target`` rows and keeps every layer within
``--target + --interval`` rows while generating. Prints, per configuration, the ratios to the full cache measured
in this run (every configuration advances one step in turn, so machine noise hits all alike): tokens/s over
the whole generation, mean step time over the last ``--tail`` steps, the share of the
generation spent in decode-time events (pseudo forwards included), the most rows any layer held, and the peak
cache bytes after the prefill. Writes ``decode_schedule.json`` and ``decode_schedule.md`` (rendered from the JSON
by :func:`markdown`, so ``--render`` re-renders a record).

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_decode_schedule.py --out docs/results/decode-schedule
    python scripts/bench_decode_schedule.py --tiny --tokens 64 --out /tmp/decode-schedule   # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from kvpress_like import build
from kvpress_like.decoding import GenerationOptions, next_token
from kvpress_like.prefill import feed

CONFIGS = {  # name -> (method, decode window); the full cache has no schedule
    "full cache": ("full", None),
    "snapkv + recent": ("snapkv", "recent"),
    "dapq + reaimed": ("dapq", "reaimed"),
    "dapq + pseudo (DapQ-D)": ("dapq", "pseudo"),
}
GREEDY = GenerationOptions(stop_at_eos=False)
FLOOR = "plain cache of target + interval/2 rows"


def load(tiny: bool):
    if tiny:
        from kvpress_like.testing import make_model

        return make_model("llama"), "tiny random Llama (kvpress_like.testing)"
    from kvpress_like.models import load_model

    return load_model("smollm2-135m")[0], "smollm2-135m"


class Generation:
    """One configuration's generation, advanced one timed step at a time (so configurations can interleave)."""

    def __init__(self, model, pipeline, ids: torch.Tensor):
        self.model, self.result = model, pipeline.prefill(model, ids)
        self.logits, self.steps, self.most_rows = self.result.next_token_logits, [], 0

    @torch.no_grad()
    def step(self) -> None:
        cache, schedule = self.result.cache, self.result.cache.decoding
        started = time.perf_counter()
        if schedule is not None:
            schedule.between_steps(self.model, cache)
        self.logits = feed(self.model, cache, next_token(self.logits, GREEDY, None)[:, None])
        self.steps.append(time.perf_counter() - started)
        self.most_rows = max(self.most_rows, max(cache.physical_length(i) for i in range(len(cache.layers))))

    def record(self) -> dict:
        cache, decoding = self.result.cache, self.result.report.decoding
        if decoding is not None:
            peak, event_seconds, events = max(decoding.peak_cache_bytes, cache.nbytes()), decoding.seconds, \
                len(decoding.event_steps)
        else:
            peak, event_seconds, events = cache.nbytes(), 0.0, 0
        return {"step_seconds": self.steps, "most_rows_after_steps": self.most_rows, "peak_cache_bytes": peak,
                "final_cache_bytes": cache.nbytes(), "event_seconds": event_seconds, "event_steps": events,
                "logical_length": cache.get_seq_length()}


def interleaved(generations: dict[str, Generation], tokens: int) -> None:
    """Advance every generation ``tokens`` steps, one step each in turn (rotating who goes first), so that a
    noisy machine slows every configuration alike."""
    names = list(generations)
    for step in range(tokens):
        for k in range(len(names)):
            generations[names[(step + k) % len(names)]].step()


def summarise(run: dict, reference: dict, tail: int) -> dict:
    total, full_total = sum(run["step_seconds"]), sum(reference["step_seconds"])
    last, full_last = run["step_seconds"][-tail:], reference["step_seconds"][-tail:]
    return {
        "tokens_per_second": len(run["step_seconds"]) / total,
        "tokens_per_second_ratio": full_total / total,
        "last_steps_ms": 1000 * sum(last) / len(last),
        "last_steps_ratio": sum(last) / sum(full_last),
        "event_share": run["event_seconds"] / total,
        "peak_cache_ratio": run["peak_cache_bytes"] / reference["peak_cache_bytes"],
    }


def markdown(record: dict, command: str) -> str:
    s = record["settings"]
    lines = [
        f"# Generation under a decode schedule: {record['model']}",
        "",
        f"{s['length']}-token prompt, {s['tokens']} greedy tokens generated one step at a time, target {s['target']} "
        f"rows per layer, interval {s['interval']}; {record['device']}, {s['threads']} threads, torch "
        f"{record['torch']}. Ratios are against the full cache of the same run; the last-steps columns average the "
        f"last {s['tail']} steps. Peak cache = the most key/value bytes held at any moment after the prefill.",
        "",
        "```bash",
        command,
        "```",
        "",
        "| configuration | tokens/s | ratio | last steps ms | ratio | events (steps) | event share "
        "| most rows between steps "
        "| peak cache MiB | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, run in record["runs"].items():
        m = run["summary"]
        lines.append(
            f"| {name} | {m['tokens_per_second']:.1f} | {m['tokens_per_second_ratio']:.2f} | {m['last_steps_ms']:.1f} "
            f"| {m['last_steps_ratio']:.2f} | {run['event_steps']} | {100 * m['event_share']:.1f} % "
            f"| {run['most_rows_after_steps']} | {run['peak_cache_bytes'] / 2**20:.1f} | {m['peak_cache_ratio']:.2f} |"
        )
    floor = record["floor"]
    lines += ["", f"Floor on this machine: a plain full cache of {floor['rows']} rows (what a schedule holds on "
              f"average) steps in {floor['first_steps_ms']:.1f} ms over its first {s['tail']} steps, "
              f"{floor['ratio_to_full_last_steps']:.2f}x the full cache's last steps: no compression of the cache "
              "can make a step cheaper than the model's weights alone."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--target", type=int, default=512)
    parser.add_argument("--interval", type=int, default=128)
    parser.add_argument("--tail", type=int, default=128, help="last steps averaged for the step-time ratio")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (seconds; CI)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--render", action="store_true", help="re-render OUT/decode_schedule.md from its JSON")
    args = parser.parse_args()
    if args.render:
        record = json.loads((args.out / "decode_schedule.json").read_text())
        (args.out / "decode_schedule.md").write_text(markdown(record, record["command"]))
        return
    torch.set_num_threads(args.threads)
    model, name = load(args.tiny)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    generations = {}
    for config in ["full cache", *[c for c in args.configs if c != "full cache"]]:
        method, window = CONFIGS[config]
        if window is None:
            pipeline = build(method)
        else:
            pipeline = build(method, budget=args.target, decoding={"target": args.target, "interval": args.interval,
                                                                   "window": window})
        generations[config] = Generation(model, pipeline, ids)
    # the floor: a plain full cache that holds as many rows as a schedule does on average, never growing much
    floor = Generation(model, build("full"), ids[:, : args.target + args.interval // 2])
    interleaved({**generations, FLOOR: floor}, args.tokens)
    runs = {name: generation.record() for name, generation in generations.items()}
    for name, run in runs.items():
        run["summary"] = summarise(run, runs["full cache"], args.tail)
        print(name, {k: round(v, 3) for k, v in run["summary"].items()}, "most rows", run["most_rows_after_steps"],
              flush=True)
    floor_steps = floor.steps[: args.tail]
    floor_record = {"rows": args.target + args.interval // 2, "first_steps_ms": 1000 * sum(floor_steps) / args.tail,
                    "ratio_to_full_last_steps": (sum(floor_steps) / args.tail) / (
                        sum(runs["full cache"]["step_seconds"][-args.tail :]) / args.tail)}
    print(FLOOR, floor_record, flush=True)
    command = shlex.join(["python", *sys.argv])
    record = {"model": name, "device": platform.processor() or "cpu", "torch": torch.__version__,
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "render")}, "command": command,
              "runs": runs, "floor": floor_record}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_schedule.json").write_text(json.dumps(record, indent=1))
    (args.out / "decode_schedule.md").write_text(markdown(record, command))


if __name__ == "__main__":
    main()
