"""Long prompts fit: every built-in method prefills a tiny random model at 32k tokens within the memory
the same model needs for an uncompressed 8k prefill.

Each case runs in a fresh process (peak resident set above the loaded model, see
``kvpress_like.eval.memory``). The model is the toy Llama of ``kvpress_like.eval.toy`` made wide enough
that its cache matters (its weights are random: this measures memory, not answers). Prints one line
per method with its peak and the ratio to the uncompressed 8k prefill, and writes the records as JSON.
With ``--prompt-chunk`` the methods that can stream (every built-in one) run a progressive prefill (the
prompt fed in chunks, compressed after each); a method that cannot (a model-wide allocator, a plugin's
window or scorer that does not stream) runs the one-pass prefill with ``--chunk-size``, and its record
says so.

    python scripts/bench_long_prompt.py --out docs/results/long-prompt
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from kvpress_like.eval.bench import long_prompt_markdown
from kvpress_like.eval.memory import PLAIN, measure_case
from kvpress_like.eval.toy import save_toy_model
from kvpress_like.factory import build
from kvpress_like.plugins import get_registry
from kvpress_like.progressive import why_not_streaming

TOY = {"layers": 4, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
       "num_key_value_heads": 4, "max_position_embeddings": 40_000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--short", type=int, default=8192, help="length of the uncompressed reference prefill")
    parser.add_argument("--long", type=int, default=32768, help="length of the compressed prefills")
    parser.add_argument("--budget", default="10%")
    parser.add_argument("--chunk-size", type=int, default=2048, help="MLP row chunks of the compressed prefills")
    parser.add_argument("--prompt-chunk", type=int, help="progressive prefill in prompt chunks of this many tokens")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per case (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        model = str(save_toy_model(folder, **TOY))

        def peak(method: str, length: int, chunk: int | None, prompt_chunk: int | None = None) -> dict:
            runs = [measure_case(model, method, length, args.budget, chunk, args.threads, prompt_chunk)
                    for _ in range(args.repeats)]
            return {**runs[0], "peak_bytes": int(statistics.median(r["peak_bytes"] for r in runs))}

        reference = peak(PLAIN, args.short, None)
        print(f"plain prefill at {args.short}: {reference['peak_bytes'] / 2**20:.0f} MiB", flush=True)
        records = [reference]
        for method in sorted(get_registry().methods):
            if method == "full":
                continue
            streams = args.prompt_chunk and why_not_streaming(build(method, budget=args.budget)) is None
            record = peak(method, args.long, args.chunk_size, args.prompt_chunk if streams else None)
            record["ratio_to_short_plain"] = record["peak_bytes"] / reference["peak_bytes"]
            records.append(record)
            print(f"{method} at {args.long}: {record['peak_bytes'] / 2**20:.0f} MiB "
                  f"({record['ratio_to_short_plain']:.2f}x the plain {args.short} prefill)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"toy_model": TOY, "settings": vars(args) | {"out": str(args.out)}, "records": records}
    (args.out / "long_prompt.json").write_text(json.dumps(record, indent=2))
    (args.out / "long_prompt.md").write_text(long_prompt_markdown(record, shlex.join(["python", *sys.argv])))


if __name__ == "__main__":
    main()
