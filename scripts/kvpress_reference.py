"""Head-to-head: NVIDIA kvpress 0.5.5 ``KVzipPress`` (the reference KVzip) against our ``kvzip`` on the same ids.

What it measures: for each context of the query-agnostic grid (docs/results/grids/query-agnostic.yaml: multi_key,
4 keys asked one by one from copies of ONE compressed cache) and each kept fraction (20/30/50/75 % of the
compressed prompt), the greedy answers of SmolLM2-135M-Instruct (fp32, sdpa) after kvpress's KVzipPress, with its
default global ranking (one top-k over all layers and heads) and with ``layerwise=True`` (equal share per layer,
one top-k over the heads of each layer), plus the full cache; next to our recorded ``kvzip`` answers
(docs/results/query-agnostic/main/cells.jsonl) on the same questions.

Two steps, two environments (kvpress 0.5.5 pins transformers < 5.3, the project uses 5.24):

    # 1. the exact token ids our harness fed the model (project venv; imports kvpress_like)
    .venv/bin/python scripts/kvpress_reference.py export
    # 2. kvpress on those ids (a separate venv with torch==2.13.0 + kvpress==0.5.5; does NOT import kvpress_like)
    OMP_WAIT_POLICY=PASSIVE /tmp/kvpress-venv/bin/python scripts/kvpress_reference.py run --contexts 8
    # (re-render summary.md only)
    /tmp/kvpress-venv/bin/python scripts/kvpress_reference.py summary

``run`` scores each context ONCE with KVzipPress (prefill + kvpress's own chunked reconstruction, run by its context
manager) and then calls KVzipPress.compress_post per (kept fraction, layerwise): the scores do not depend on either,
only the masks do (checked on context 1024/0: the same 36 answers and per-layer kept shares as a separate
``with press(model)`` prefill per budget). It appends one line per context x method x budget to records.jsonl
and skips lines already there (resumable);
both ``run`` and ``summary`` rewrite summary.md. Correctness is our harness's rule (``Sample.is_correct``),
reimplemented in ``is_correct`` below from the ``match`` mode the export writes per question.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "docs/results/grids/query-agnostic.yaml"
OURS = ROOT / "docs/results/query-agnostic/main/cells.jsonl"  # our kvzip (label kvzip: the `global` allocator)
OURS_LAYERS = ROOT / "docs/results/query-agnostic/layers/cells.jsonl"  # label kvzip_layers: `global_layers`
OUT = ROOT / "docs/results/query-agnostic/kvpress"
SAMPLES, RECORDS, SUMMARY = OUT / "samples.json", OUT / "records.jsonl", OUT / "summary.md"
METHODS = {"full": None, "kvpress_kvzip": False, "kvpress_kvzip_layerwise": True}  # name -> KVzipPress.layerwise
JUDGE = ('correct = every accepted answer is a substring of the decoded answer ("all"), at least one is ("any", '
         'the multi_key default), or one appears as a whole word, case-insensitive ("word"): Sample.is_correct')


def export(_args) -> None:
    import torch

    from kvpress_like.eval.grid import grid_samples, load_grid
    from kvpress_like.eval.protocols import prepare
    from kvpress_like.eval.records import cell_key
    from kvpress_like.models import embedded_checkpoint, load_model
    from kvpress_like.pipeline import eos_ids

    torch.set_num_threads(1)
    grid = load_grid(GRID)
    model, tokenizer = load_model(grid.model, dtype=getattr(torch, grid.dtype))
    contexts = []
    for task, length, index, sample in grid_samples(grid, tokenizer):
        for protocol in grid.protocols:
            questions = sample.questions()  # the asked key first, then the follow-ups, as the engine orders them
            prompts = [prepare(tokenizer, q, protocol, grid.answer_prefix) for q in questions]
            n = prompts[0].compress_length  # template head + context + separator: what the engine compresses
            head = prompts[0].input_ids[0, :n].tolist()
            assert all(p.input_ids[0, :n].tolist() == head for p in prompts), "questions must share the context"
            contexts.append({
                "cell": cell_key(task, length, protocol, index), "task": task, "length": length, "index": index,
                "protocol": protocol, "context_ids": head,
                "questions": [{"ids": p.input_ids[0, n:].tolist(), "answers": q.answers, "match": q.match,
                               "max_new_tokens": grid.max_new_tokens or q.max_new_tokens}
                              for q, p in zip(questions, prompts, strict=True)],
            })
    OUT.mkdir(parents=True, exist_ok=True)
    SAMPLES.write_text(json.dumps({
        "grid": str(GRID.relative_to(ROOT)), "model_folder": str(embedded_checkpoint(grid.model)),
        "dtype": grid.dtype, "budgets": [str(b) for b in grid.budgets], "eos_ids": sorted(eos_ids(model, tokenizer)),
        "judge": JUDGE, "decoding": "greedy; the question ids fed at positions len(context_ids)...; stop after an "
        "EOS id (kept in the answer, decoded with skip_special_tokens) or max_new_tokens tokens",
        "contexts": contexts,
    }))
    print(f"wrote {len(contexts)} contexts to {SAMPLES}")


def is_correct(prediction: str, answers: list[str], match: str) -> bool:
    if match == "word":
        return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", prediction, re.IGNORECASE) for a in answers)
    hits = [a in prediction for a in answers]
    return all(hits) if match == "all" else any(hits)


def run(args) -> None:
    import logging

    import torch
    from kvpress import KVzipPress  # importing kvpress patches the attention functions (head-wise key masking)
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
    from transformers.utils import logging as hf_logging

    class ScoredKVzip(KVzipPress):
        """KVzipPress that keeps a copy of its reconstruction scores, so every budget reuses one scoring pass."""

        def compress_post(self, model):
            self.kept_scores = self.score_val.clone()  # before compress_post gives the sinks the top score
            super().compress_post(model)

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    logging.getLogger("kvpress").setLevel(logging.ERROR)
    data = json.loads(SAMPLES.read_text())
    folder, eos = data["model_folder"], set(data["eos_ids"])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, data["dtype"]),
                                                 attn_implementation="sdpa", local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    done = {(r["cell"], r["method"], r["budget"]) for r in read_jsonl(RECORDS)}
    chosen = [c for c in data["contexts"] if c["index"] < args.contexts and c["length"] in args.lengths]
    for ctx in sorted(chosen, key=lambda c: (c["index"], c["length"])):
        ids = torch.tensor([ctx["context_ids"]])
        todo = [(m, b) for m, lw in METHODS.items() for b in (["100%"] if lw is None else data["budgets"])
                if (ctx["cell"], m, b) not in done]
        if not todo:
            continue
        base = {"cell": ctx["cell"], "length": ctx["length"], "index": ctx["index"], "context_tokens": ids.shape[1]}
        for layer in model.model.layers:
            layer.self_attn.masked_key_indices = None
        if ("full", "100%") in todo:
            started, cache = time.perf_counter(), DynamicCache()
            with torch.no_grad():
                model.model(input_ids=ids, past_key_values=cache)
            seconds = round(time.perf_counter() - started, 3)
            write(base | {"method": "full", "budget": "100%", "prefill_seconds": seconds},
                  model, tokenizer, cache, ctx, eos, started)
            todo.remove(("full", "100%"))
        if not todo:
            continue
        # One KVzip pass (prefill + kvpress's own chunked reconstruction); its scores serve every budget and both
        # rankings: KVzipPress's scoring does not depend on compression_ratio or layerwise, only compress_post does.
        started, cache, press = time.perf_counter(), DynamicCache(), ScoredKVzip(compression_ratio=0.5)
        with torch.no_grad(), press(model):
            model.model(input_ids=ids, past_key_values=cache)
            base |= {"prefix_length": press.prefix_length, "suffix_ids": press._suffix_ids[0].tolist()}
        base["prefill_seconds"] = round(time.perf_counter() - started, 3)  # prefill + scoring, shared by the budgets
        for method, budget in todo:
            started = time.perf_counter()
            press.score_val = press.kept_scores.clone()
            press.compression_ratio = round(1 - float(budget.rstrip("%")) / 100, 6)  # kvpress: the fraction REMOVED
            press.layerwise = METHODS[method]
            KVzipPress.compress_post(press, model)  # sets each attention module's masked_key_indices
            write(base | {"method": method, "budget": budget, "compression_ratio": press.compression_ratio,
                          "kept_per_layer": kept_per_layer(model, ids.shape[1])},
                  model, tokenizer, cache, ctx, eos, started)
    render()


def write(record, model, tokenizer, cache, ctx, eos, started) -> None:
    """Answer every question from a deep copy of ``cache``; append the record to records.jsonl."""
    record["questions"] = []
    for q in ctx["questions"]:
        tokens = answer(model, copy.deepcopy(cache), q["ids"], len(ctx["context_ids"]), q["max_new_tokens"], eos)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        record["questions"].append({"answer": text, "correct": is_correct(text, q["answers"], q["match"]),
                                    "answer_tokens": len(tokens)})
    record["answer_seconds"] = round(time.perf_counter() - started, 3)
    with RECORDS.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(record["cell"], record["method"], record["budget"], [q["answer"] for q in record["questions"]], flush=True)


def kept_per_layer(model, length: int) -> list[float]:
    """Share of (head, token) pairs of each layer that KVzipPress left unmasked (its compression is a mask)."""
    out = []
    for layer in model.model.layers:
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        heads = model.config.num_key_value_heads
        out.append(round(1 - (0 if masked is None else len(masked[2])) / (heads * length), 4))
    return out


def answer(model, cache, question_ids: list[int], start: int, max_new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy answer: the question ids at positions start..., then one token at a time (as kvpress's pipeline)."""
    import torch

    with torch.no_grad():
        q = torch.tensor([question_ids])
        position = torch.arange(start, start + q.shape[1])[None]
        logits = model(input_ids=q, past_key_values=cache, position_ids=position, logits_to_keep=1).logits[0, -1]
        tokens, next_position = [], start + q.shape[1]
        for step in range(max_new_tokens):
            tokens.append(int(logits.argmax()))
            if tokens[-1] in eos or step == max_new_tokens - 1:
                break
            logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                           position_ids=torch.tensor([[next_position + step]])).logits[0, -1]
    return tokens


# ---------------------------------------------------------------------------------------------------------------
# summary.md
# ---------------------------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written by another run
    return out


def our_answers(record: dict, label: str) -> dict:
    """{(method, budget): [(answer, correct) per question]} of one of our cells.jsonl records (rows ``label``)."""
    entries = [record, *record.get("followups", [])]
    out = {("full", "100%"): [(e["reference"]["answer"], e["reference"]["correct"]) for e in entries]}
    for row in record["rows"]:
        if row["label"] == label:
            out[(f"ours_{label}", row["budget"])] = [
                next((r["answer"], r["correct"]) for r in e["rows"] if r["label"] == label
                     and r["budget"] == row["budget"]) for e in entries]
    return out


def section(title: str, group: list[str], theirs: dict, ours: dict, budgets: list[str],
            pairs: tuple[tuple[str, str], ...] = (("kvpress_kvzip", "ours_kvzip"),
                                                   ("kvpress_kvzip_layerwise", "ours_kvzip"))) -> list[str]:
    """Accuracy/retention table and per-question agreement of each (kvpress method, our method) pair for the
    contexts ``group``."""
    lines = [f"## {title} ({len(group)} contexts: {', '.join(c.split('|')[1] + '/' + c.split('|')[3] for c in group)})",
             ""]
    full_k = [ok for c in group for _, ok in theirs[c][("full", "100%")]]
    full_o = [ok for c in group for _, ok in ours[c][("full", "100%")]]
    same = sum(a == b for c in group for (a, _), (b, _) in zip(theirs[c][("full", "100%")],
                                                              ours[c][("full", "100%")], strict=True))
    lines += [f"Full cache: kvpress venv {sum(full_k)}/{len(full_k)}, ours {sum(full_o)}/{len(full_o)}; "
              f"identical full-cache answer strings: {same}/{len(full_k)}.", "",
              "| method | " + " | ".join(budgets) + " |", "| --- |" + " ---: |" * len(budgets)]
    shown = list(dict.fromkeys(m for pair in pairs for m in pair))
    for method, source, full in [(m, ours if m.startswith("ours_") else theirs,
                                  full_o if m.startswith("ours_") else full_k) for m in shown]:
        row = []
        for b in budgets:
            oks = [ok for c in group for _, ok in source[c].get((method, b), [])]
            acc = sum(oks) / len(oks) if oks else float("nan")
            ret = acc / (sum(full) / len(full)) if sum(full) else float("nan")
            row.append(f"{sum(oks)}/{len(oks)} = {100 * acc:.0f}% (ret. {100 * ret:.0f}%)")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines += ["", "Per-question agreement (both right / only kvpress / only ours / both wrong; identical answer "
              "strings):", "", "| kvpress method | our method | budget | both | only kvpress | only ours | "
              "neither | same answer |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for method, mine in pairs:
        for b in budgets:
            both = [(k, o) for c in group for k, o in zip(theirs[c][(method, b)], ours[c][(mine, b)], strict=True)]
            counts = [sum(k[1] and o[1] for k, o in both), sum(k[1] and not o[1] for k, o in both),
                      sum(o[1] and not k[1] for k, o in both), sum(not k[1] and not o[1] for k, o in both),
                      sum(k[0] == o[0] for k, o in both)]
            lines.append(f"| {method} | {mine} | {b} | " + " | ".join(map(str, counts)) + " |")
    return [*lines, ""]


def render() -> None:
    records = read_jsonl(RECORDS)
    ours = {r["cell"]: our_answers(r, "kvzip") for r in read_jsonl(OURS)}
    layers = {r["cell"]: our_answers(r, "kvzip_layers") for r in read_jsonl(OURS_LAYERS)}
    theirs: dict = {}
    for r in records:
        theirs.setdefault(r["cell"], {})[(r["method"], r["budget"])] = [(q["answer"], q["correct"])
                                                                      for q in r["questions"]]
    budgets = sorted({r["budget"] for r in records if r["method"] != "full"}, key=lambda b: float(b.rstrip("%")))
    # a context counts once kvpress has all of its lines and our cells.jsonl holds it
    need = {("full", "100%")} | {(m, b) for m in METHODS if m != "full" for b in budgets}
    cells = sorted((c for c in theirs if c in ours and need <= set(theirs[c])),
                   key=lambda c: (int(c.split("|")[1]), int(c.split("|")[3])))
    lines = ["# kvpress 0.5.5 KVzipPress vs our kvzip (query-agnostic, multi_key, 4 questions per context)", "",
             "Rendered by `scripts/kvpress_reference.py` from `records.jsonl` (kvpress, this folder) and "
             "`../main/cells.jsonl` and `../layers/cells.jsonl` (ours), on the same token ids (`samples.json`). "
             "Accuracy = questions right / "
             "questions; retention = accuracy / the same harness's full-cache accuracy. `kvpress_kvzip`: "
             "KVzipPress defaults (one ranking over all layers and heads); `kvpress_kvzip_layerwise`: "
             "`layerwise=True` (equal share per layer, ranked across the layer's heads, like ours).", ""]
    lengths = sorted({int(c.split("|")[1]) for c in cells})
    groups = []
    for length in lengths:
        every = [c for c in cells if int(c.split("|")[1]) == length]
        first = [c for c in every if int(c.split("|")[3]) < 8]
        groups += [(f"{length} tokens, contexts 0-7", first)] if first else []
        groups += [(f"{length} tokens, all contexts in both files", every)] if len(every) > len(first) else []
    if len(lengths) > 1:
        groups.append(("all lengths, contexts 0-7", [c for c in cells if int(c.split("|")[3]) < 8]))
    for title, group in groups:
        lines += section(title, group, theirs, ours, budgets)
    for length in lengths:  # our kvzip with the global_layers allocator, against kvpress's default ranking
        group = [c for c in cells if int(c.split("|")[1]) == length and c in layers]
        if group:
            both = {c: {**ours[c], **layers[c]} for c in group}
            lines += section(f"{length} tokens, our kvzip with allocator global_layers (kvpress's default ranking), "
                             "contexts in all three files", group, theirs, both, budgets,
                             pairs=(("kvpress_kvzip", "ours_kvzip_layers"), ("kvpress_kvzip_layerwise", "ours_kvzip")))
    kept = [r for r in records if "kept_per_layer" in r and r["cell"] in cells]
    if kept:
        lines += ["## Kept share per layer (kvpress, mean over contexts; layer 0 … 29)", ""]
        for method in ("kvpress_kvzip", "kvpress_kvzip_layerwise"):
            for b in budgets:
                rows = [r["kept_per_layer"] for r in kept if r["method"] == method and r["budget"] == b]
                if rows:
                    mean = [sum(col) / len(col) for col in zip(*rows, strict=True)]
                    lines.append(f"- {method} {b}: " + " ".join(f"{100 * v:.0f}" for v in mean))
        lines.append("")
    seconds = {}
    for r in records:
        if r["cell"] in cells:
            seconds.setdefault((r["length"], r["method"]), []).append(r["prefill_seconds"])
    lines += ["Mean seconds, 1 CPU thread, of the plain prefill (full) and of the prefill + KVzipPress scoring pass "
              "(one per context, shared by its 8 kvpress caches): " + "; ".join(
        f"{m} @ {n}: {sum(v) / len(v):.1f}" for (n, m), v in sorted(seconds.items())), ""]
    SUMMARY.write_text("\n".join(lines))
    print(SUMMARY.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("export")
    runner = sub.add_parser("run")
    runner.add_argument("--contexts", type=int, default=8, help="first N contexts per length")
    runner.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    sub.add_parser("summary")
    args = parser.parse_args()
    {"export": export, "run": run, "summary": lambda _: render()}[args.step](args)


if __name__ == "__main__":
    main()
