"""The "where > what" probe: the DapQ paper's Table 1 and Table 8 / Fig. 3, reproduced on any model.

Per sample (prose from ``pydoc_data.topics`` followed by a request to summarise it; chat template on):

1. prefill the prompt (length L) and let the model answer greedily for ``n_true`` tokens (no EOS stop);
2. replay that answer at positions L … L+n−1: its queries are the **true decoding queries** (pre- and
   post-RoPE, every layer), and their causal softmax attention over the prompt is the true attention;
3. **Table 1** (§3.1): run 32-token pseudo sequences after the prompt with the *same content* (SC, the
   true answer) or a *different content* (DC, "Sorry, I don't know." repeated), at the *same positions*
   (SP, L …) or *different positions* (DP, 0 … n−1), and take the cosine between each pseudo query and
   the true query of the same index (per head and token, then averaged), per layer, pre and post RoPE;
4. **window builders** (Table 8, §3.3): the attention of each window's queries over the prompt —
   ``pseudo`` (DapQ: first 4 + last N−4 prompt ids at L …), ``semantic`` (same content at 0 …),
   ``suffix`` (SnapKV: the last w prompt tokens), ``question`` (the question's tokens) — compared with
   the true attention: cosine similarity (Table 8), attention recall of the tokens the window would keep
   at each budget (share of the true attention mass they hold), and the paper's Recall_W (overlap of the
   window's top-k with the true top-k). Windows of several sizes for ``pseudo`` and ``suffix``.

Where the paper is silent (its §6 item 9: which layer, how the 32 queries are aggregated) we report every
layer and the mean over layers, and average cosines over heads and tokens.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvpress_like.cache import CompressedCache
from kvpress_like.eval import metrics
from kvpress_like.eval.capture import QueryCapture
from kvpress_like.eval.haystack import haystack
from kvpress_like.eval.protocols import greedy
from kvpress_like.prefill import forward, shallow_copy
from kvpress_like.prompting import build_prompt
from kvpress_like.windows import PseudoContentConfig, pseudo_content

WRONG_CONTENT = "Sorry, I don't know. "
QUESTION = "Summarize the text above in a few sentences."
CONDITIONS = ("SC&SP", "DC&SP", "SC&DP", "DC&DP")


@dataclass
class ProbeSettings:
    length: int = 2048
    samples: int = 16
    seed: int = 0
    n_true: int = 32
    window_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    budgets: tuple[str, ...] = ("5%", "10%", "20%")
    question: str = QUESTION
    extra: dict[str, Any] = field(default_factory=dict)


def pseudo_prefix(n: int) -> int:
    """Leading prompt ids in a pseudo window of size n: 4 (the paper's 4 + 28) scaled down for tiny windows."""
    return min(4, n // 4)


def _run(model, cache, ids: torch.Tensor, start: int, capture: QueryCapture) -> None:
    with capture:
        forward(model, cache, ids, torch.arange(start, start + ids.shape[1], device=model.device))


def _budget_tokens(budget: str, length: int) -> int:
    from kvpress_like.budget import Budget

    return Budget.model_validate(budget).resolve(length)


@torch.no_grad()
def probe_sample(model, tokenizer, settings: ProbeSettings, index: int) -> dict[str, Any]:
    """All probe measurements for sample ``index``: per layer lists, keyed by condition / window."""
    seed = settings.seed + index
    context = "\n\n".join(haystack(tokenizer, settings.length, seed))
    prompt = build_prompt(tokenizer, context, settings.question)
    ids = prompt.input_ids.to(model.device)
    length = ids.shape[1]
    n = settings.n_true
    largest = min(max(settings.window_sizes), length)
    q_start, q_end = prompt.question_span
    keep = torch.unique(torch.cat([torch.arange(length - largest, length), torch.arange(q_start, q_end)]))
    cache = CompressedCache(model.config)
    in_prompt = QueryCapture(model, keep_queries=True, rows=keep)
    with in_prompt:
        logits = forward(model, cache, ids, torch.arange(length, device=model.device))
    (answer,) = greedy(model, shallow_copy(cache), logits, n, eos=set())
    answer_ids = torch.tensor([answer], device=model.device)
    true = QueryCapture(model, prefix=length, keep_queries=True, pre_rope=True)
    _run(model, shallow_copy(cache), answer_ids, length, true)
    layers = sorted(true.mass)

    wrong = tokenizer.encode(WRONG_CONTENT * (n // 4 + 2), add_special_tokens=False)[:n]
    wrong_ids = torch.tensor([wrong], device=model.device)
    conditions = {"SC&SP": (answer_ids, length), "DC&SP": (wrong_ids, length), "SC&DP": (answer_ids, 0),
                  "DC&DP": (wrong_ids, 0)}
    table1: dict[str, dict[str, list[float]]] = {}
    for name, (content, start) in conditions.items():
        cap = true if name == "SC&SP" else QueryCapture(model, keep_queries=True, pre_rope=True)
        if name != "SC&SP":
            _run(model, shallow_copy(cache), content, start, cap)
        table1[name] = {
            "post": [metrics.query_cosine(cap.stacked(i), true.stacked(i)) for i in layers],
            "pre": [metrics.query_cosine(cap.stacked(i, True), true.stacked(i, True)) for i in layers],
        }

    # Window builders: the attention over the prompt of each window's queries.
    windows: dict[str, dict[int, torch.Tensor]] = {}
    for size in settings.window_sizes:
        content = pseudo_content(ids, PseudoContentConfig(n_pseudo=size, prefix=pseudo_prefix(size)))
        for name, start in ((f"pseudo/{size}", length), (f"semantic/{size}", 0)):
            if name.startswith("semantic") and size != 32:
                continue
            cap = QueryCapture(model, prefix=length)
            _run(model, shallow_copy(cache), content, start, cap)
            windows[name] = cap.mass
    prompt_keys = {i: cache.layers[i].keys for i in layers}
    local = {int(r): j for j, r in enumerate(keep)}
    for size in settings.window_sizes:
        if size <= length:
            rows = range(length - size, length)
            windows[f"suffix/{size}"] = _in_prompt_mass(model, in_prompt, prompt_keys, local, rows, length)
    windows["question/all"] = _in_prompt_mass(model, in_prompt, prompt_keys, local, range(q_start, q_end), length)

    window_metrics = {}
    for name, mass in windows.items():
        entry = {"similarity": [metrics.attention_similarity(mass[i][0], true.mass[i][0]) for i in layers]}
        for budget in settings.budgets:
            k = _budget_tokens(budget, length)
            recall, overlap = [], []
            for i in layers:
                score, gold = mass[i][0].mean(1), true.mass[i][0].mean(1)  # [kv_heads, L]: GQA mean, as the scorer
                kept = score.topk(k, dim=-1).indices
                recall.append(metrics.attention_recall(true.mass[i][0], kept))
                overlap.append(metrics.topk_recall(gold, score, k))
            entry[f"recall@{budget}"] = recall
            entry[f"topk_recall@{budget}"] = overlap
        window_metrics[name] = entry
    return {"index": index, "seed": seed, "prompt_tokens": length, "answer": tokenizer.decode(answer),
            "table1": table1, "windows": window_metrics, "layers": layers}


def _in_prompt_mass(model, capture: QueryCapture, keys: dict, local: dict, rows, length: int) -> dict:
    from kvpress_like.plugins import get_adapter

    modules = get_adapter(model).attention_modules()
    rows = list(rows)
    pick = torch.tensor([local[r] for r in rows])
    out = {}
    for i, key in keys.items():
        queries = capture.stacked(i)[:, :, pick]
        out[i] = metrics.attention_mass(queries, key, torch.tensor(rows), modules[i].scaling, length)
    return out


def run_probe(model, tokenizer, settings: ProbeSettings, progress: bool = True) -> dict[str, Any]:
    """Probe ``settings.samples`` samples; returns per-sample results and the averages."""
    started = time.perf_counter()
    iterator = range(settings.samples)
    if progress:
        try:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="probe", unit="sample")
        except ImportError:
            pass
    samples = [probe_sample(model, tokenizer, settings, i) for i in iterator]
    return {"settings": settings.__dict__, "samples": samples, "summary": summarise(samples),
            "seconds": round(time.perf_counter() - started, 1)}


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _std(values: list[float]) -> float:
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over samples: per layer, and of the per-sample means over layers (with their std)."""
    layers = samples[0]["layers"]
    table1 = {}
    for cond in CONDITIONS:
        table1[cond] = {}
        for rope in ("post", "pre"):
            per_sample = [_mean(s["table1"][cond][rope]) for s in samples]
            per_layer = [_mean([s["table1"][cond][rope][j] for s in samples]) for j in range(len(layers))]
            table1[cond][rope] = {"mean": _mean(per_sample), "std": _std(per_sample), "layers": per_layer}
    windows = {}
    for name in samples[0]["windows"]:
        windows[name] = {}
        for metric in samples[0]["windows"][name]:
            per_sample = [_mean(s["windows"][name][metric]) for s in samples]
            per_layer = [_mean([s["windows"][name][metric][j] for s in samples]) for j in range(len(layers))]
            windows[name][metric] = {"mean": _mean(per_sample), "std": _std(per_sample), "layers": per_layer}
    return {"layers": layers, "n": len(samples), "table1": table1, "windows": windows}


def probe_markdown(result: dict[str, Any], model_name: str, command: str | None = None) -> str:
    s, settings = result["summary"], result["settings"]
    lengths = [x["prompt_tokens"] for x in result["samples"]]
    lines = [
        "# Probe: where matters more than what (DapQ paper, Table 1 and Table 8) on " + model_name, "",
        f"{s['n']} samples of pydoc prose + \"{settings['question']}\", prompts of {min(lengths)}–{max(lengths)} "
        f"tokens; true decoding queries = the model's first {settings['n_true']} greedy answer tokens; "
        f"{result['seconds']} s.",
    ]
    if command:
        lines += ["", "```bash", command, "```"]
    lines += ["", "## Table 1: cosine similarity to the true decoding queries (mean over layers, heads, tokens; "
              "± std over samples)", "", "| condition | post-RoPE | pre-RoPE |", "| --- | ---: | ---: |"]
    labels = {"SC&SP": "SC & SP (true content, true positions)", "DC&SP": "DC & SP (wrong content, true positions)",
              "SC&DP": "SC & DP (true content, positions 0…)", "DC&DP": "DC & DP"}
    for cond in CONDITIONS:
        post, pre = s["table1"][cond]["post"], s["table1"][cond]["pre"]
        lines.append(
            f"| {labels[cond]} | {post['mean']:.4f} ± {_z(post['std'])} | {pre['mean']:.4f} ± {_z(pre['std'])} |"
        )
    post = s["table1"]
    ratio = post["DC&SP"]["post"]["mean"] / post["SC&DP"]["post"]["mean"]
    lines += ["", f"Right position / wrong content over right content / wrong position (post-RoPE): **{ratio:.2f}×** "
              "(paper, Llama-3-8B: 0.7238 / 0.3522 = 2.06×).", ""]
    lines += ["### Per layer (post-RoPE / pre-RoPE)", "",
              "| layer | " + " | ".join(CONDITIONS[1:]) + " |",
              "| ---: | " + " | ".join("---:" for _ in CONDITIONS[1:]) + " |"]
    for j, layer in enumerate(s["layers"]):
        cells = [f"{s['table1'][c]['post']['layers'][j]:.3f} / {s['table1'][c]['pre']['layers'][j]:.3f}"
                 for c in CONDITIONS[1:]]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    windows = s["windows"]
    budgets = settings["budgets"]
    lines += ["", "## Window builders against the true decoding attention", "",
              "Attention similarity = cosine between the window's and the true queries' attention over the prompt "
              "(Table 8). Recall@b = share of the true attention mass on the tokens the window keeps at budget b "
              "(per KV head, GQA mean). Top-k recall@b = |top-k(window) ∩ top-k(true)| / k (the paper's Recall_W).",
              "", "| window | size | similarity | " + " | ".join(f"recall@{b}" for b in budgets) + " | "
              + " | ".join(f"top-k recall@{b}" for b in budgets) + " |",
              "| --- | ---: | ---: | " + " | ".join("---:" for _ in budgets * 2) + " |"]
    for name, entry in windows.items():
        kind, size = name.split("/")
        row = [f"{entry['similarity']['mean']:.4f}"]
        row += [f"{100 * entry[f'recall@{b}']['mean']:.1f}" for b in budgets]
        row += [f"{100 * entry[f'topk_recall@{b}']['mean']:.1f}" for b in budgets]
        lines.append(f"| {kind} | {size} | " + " | ".join(row) + " |")
    lines += ["", "Paper, Table 8 (Llama-3-8B, GovReport), similarity at window 32: DapQ 0.9726, SnapKV 0.9508.", ""]
    return "\n".join(lines)


def _z(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.4f}"


def write_probe(result: dict[str, Any], out: str | Path, model_name: str, command: str | None = None) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "probe.md").write_text(probe_markdown(result, model_name, command))
    files = [out / "probe.json", out / "probe.md"]
    with contextlib.suppress(ImportError):
        files.append(_plot(result, out / "probe_layers.png"))
    return files


def _plot(result: dict[str, Any], path: Path) -> Path:
    from kvpress_like.eval.plots import _pyplot

    plt = _pyplot()
    s = result["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for cond in CONDITIONS[1:]:
        axes[0].plot(s["layers"], s["table1"][cond]["post"]["layers"], label=cond)
        axes[1].plot(s["layers"], s["table1"][cond]["pre"]["layers"], label=cond)
    for ax, title in zip(axes[:2], ("post-RoPE", "pre-RoPE"), strict=True):
        ax.set_title(f"query cosine to true decoding queries ({title})", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    budget = result["settings"]["budgets"][len(result["settings"]["budgets"]) // 2]
    for name in ("pseudo/32", "semantic/32", "suffix/32", "question/all"):
        if name in s["windows"]:
            axes[2].plot(s["layers"], [100 * v for v in s["windows"][name][f"recall@{budget}"]["layers"]], label=name)
    axes[2].set_title(f"attention recall of each window's top-k at {budget}", fontsize=9)
    axes[2].set_xlabel("layer")
    axes[2].set_ylim(0, 100)
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
