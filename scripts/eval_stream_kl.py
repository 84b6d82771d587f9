"""Per-token KL and perplexity of a long text under a bounded cache (StreamingLLM's evaluation), per decode window.

A ``--length``-token text (offline prose, ``kvpress_like.eval.haystack``) is read once with the full cache: the
reference next-token distributions. Each configuration prefills its first ``--prefix`` tokens, then reads the rest
teacher-forced in chunks of ``--chunk`` tokens under a decode schedule (target ``--target``, interval
``--interval``), keeping every row's logits. Reported over the positions past ``target + interval`` (where the
cache is bounded): mean KL(full ‖ compressed) in nats, the perplexity of the text, and the share of positions
whose greedy token equals the full cache's. Writes ``OUT/stream_kl.json`` and ``OUT/stream_kl.md`` (``--render``
re-renders the table from the JSON).

    OMP_WAIT_POLICY=PASSIVE python scripts/eval_stream_kl.py --out docs/results/stream-kl
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch

from kvpress_like import build
from kvpress_like.compat import model_inputs
from kvpress_like.eval.haystack import haystack

CONFIGS = {  # name -> (method, decode window)
    "sinks + recent (StreamingLLM)": ("streaming_llm", "none"),
    "recent queries (SnapKV-D)": ("snapkv", "recent"),
    "recent queries, H2O scores": ("h2o", "recent"),
    "last query (TOVA)": ("tova", "recent"),
    "re-aimed queries (DapQ-D)": ("dapq_reaimed", "reaimed"),
    "pseudo queries (DapQ-D, faithful)": ("dapq", "pseudo"),
}


@torch.no_grad()
def streamed_logits(model, pipeline, ids: torch.Tensor, prefix: int, chunk: int) -> torch.Tensor:
    """Log-probabilities ``[n, vocab]`` of every token after the first of ``ids[:, prefix-1:]``'s rows, read under
    ``pipeline``'s prefill and decode schedule."""
    result = pipeline.prefill(model, ids[:, :prefix])
    cache, rows = result.cache, [result.next_token_logits.float().log_softmax(-1)]
    for start in range(prefix, ids.shape[1] - 1, chunk):
        cache.decoding.between_steps(model, cache)
        piece = ids[:, start : min(start + chunk, ids.shape[1] - 1)]
        first = cache.get_seq_length()
        positions = torch.arange(first, first + piece.shape[1])[None]
        out = model(**model_inputs(model, cache, input_ids=piece, position_ids=positions))
        rows.append(out.logits[0].float().log_softmax(-1))
    return torch.cat(rows)  # predictions of ids[prefix:]


def measure(reference: torch.Tensor, got: torch.Tensor, targets: torch.Tensor) -> dict:
    kl = (reference.exp() * (reference - got)).sum(-1)
    nll = -got.gather(-1, targets[:, None]).squeeze(-1)
    return {"kl": float(kl.mean()), "perplexity": math.exp(float(nll.mean())),
            "greedy_agreement": float((got.argmax(-1) == reference.argmax(-1)).float().mean())}


def markdown(record: dict, command: str) -> str:
    s = record["settings"]
    lines = [
        f"# Per-token KL and perplexity under a bounded cache: {record['model']}",
        "",
        f"A {s['length']}-token offline text; each configuration prefills {s['prefix']} tokens, then reads the rest "
        f"in chunks of {s['chunk']} under a decode schedule (target {s['target']}, interval {s['interval']}). Over "
        f"the {record['positions']} positions past target + interval: mean KL(full ‖ compressed), perplexity, and the "
        "share of positions whose greedy token is the full cache's.",
        "",
        "```bash",
        command,
        "```",
        "",
        "| configuration | method | KL (nats) | perplexity | greedy agreement |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, run in record["runs"].items():
        lines.append(f"| {name} | {run['method']} | {run['kl']:.4f} | {run['perplexity']:.2f} | "
                     f"{100 * run['greedy_agreement']:.1f} % |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--prefix", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--target", type=int, default=256)
    parser.add_argument("--interval", type=int, default=64)
    parser.add_argument("--seed", type=int, default=80_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    if args.render:
        record = json.loads((args.out / "stream_kl.json").read_text())
        (args.out / "stream_kl.md").write_text(markdown(record, record["command"]))
        return
    from kvpress_like.models import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m")
    text = "\n\n".join(haystack(tokenizer, args.length + 256, args.seed))
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)[: args.length]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits[0, args.prefix - 1 : -1].float().log_softmax(-1)
    targets = ids[0, args.prefix :]
    start = max(0, args.target + args.interval - args.prefix)  # the bounded part
    runs = {}
    for name, (method, window) in CONFIGS.items():
        budget = min(args.target, args.prefix)
        pipeline = build(method, budget=budget, decoding={"target": args.target, "interval": args.interval,
                                                          "window": window})
        got = streamed_logits(model, pipeline, ids, args.prefix, args.chunk)
        runs[name] = {"method": method, "window": window, "config": pipeline.config,
                      **measure(reference[start:], got[start:], targets[start:])}
        print(name, {k: v for k, v in runs[name].items() if k != "config"}, flush=True)
    runs["full cache"] = {"method": "full", "window": None, **measure(reference[start:], reference[start:],
                                                                       targets[start:])}
    command = shlex.join(["python", *sys.argv])
    record = {"model": "smollm2-135m", "settings": {k: v for k, v in vars(args).items() if k not in ("out", "render")},
              "positions": int(targets.shape[0] - start), "command": command, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stream_kl.json").write_text(json.dumps(record, indent=1))
    (args.out / "stream_kl.md").write_text(markdown(record, command))


if __name__ == "__main__":
    main()
