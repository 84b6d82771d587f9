"""Aggregate ``cells.jsonl`` into tables (JSON, CSV, Markdown) and plots.

Every accuracy comes with its sample count and a Wilson 95% interval; retention is the method's
accuracy divided by the full cache's accuracy on the same cells; B95 is the smallest budget from which
on retention stays ≥ 95% (see :func:`kvpress_like.eval.metrics.b95`).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvpress_like.eval import metrics
from kvpress_like.eval.records import ALL, CELLS_FILE, FULL, NO_BUDGET, budget_key, merge_cells, read_cells

if TYPE_CHECKING:
    from kvpress_like.eval.runner import Run

TABLE_FIELDS = (
    "task", "protocol", "length", "method", "budget", "n", "correct", "accuracy", "ci_low", "ci_high",
    "full_accuracy", "retention", "score", "token_match", "kl", "recall", "similarity", "cost", "errors",
)


def _tasks(cell: dict[str, Any]) -> list[str]:
    """The task, and for a question of a multi-question sample also ``<task>_q<number>`` (per-question tables)."""
    return [cell["task"]] + ([f"{cell['task']}_q{cell['question']}"] if "question" in cell else [])


def aggregate(
    records: list[dict[str, Any]], order: list[str] | None = None, protocols: list[str] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(table, b95)``: one table row per (task, protocol, length, method, budget), lengths also pooled.

    Methods are listed in ``order`` (e.g. the grid's), the full cache first, unknown ones last by name.
    """
    cells = merge_cells(records)
    groups: dict[tuple, list[tuple[dict, dict | None]]] = defaultdict(list)
    lengths = {cell["length"] for cell in cells.values()}
    for cell in cells.values():
        scopes = [cell["length"]] + ([ALL] if len(lengths) > 1 else [])
        for task, length in itertools.product(_tasks(cell), scopes):
            base = (task, cell["protocol"], length)
            groups[(*base, FULL, NO_BUDGET)].append((cell["reference"], None))
            for (label, budget), row in cell["rows"].items():
                groups[(*base, label, budget)].append((cell["reference"], row))
    table = [_table_row(key, items) for key, items in groups.items()]
    rank = {name: i for i, name in enumerate(order or [])}
    protocol_rank = {name: i for i, name in enumerate(protocols or [])}
    table.sort(key=lambda r: (r["task"], protocol_rank.get(r["protocol"], len(protocol_rank)), r["protocol"],
                              _length_key(r["length"]), r["method"] != FULL,
                              rank.get(r["method"], len(rank)), r["method"], budget_key(r["budget"])))
    return table, _b95_rows(table)


def paired(records: list[dict[str, Any]], anchor: str) -> dict[tuple, tuple[int, int, float]]:
    """``anchor`` against every other method on the same cells: ``(wins, losses, exact McNemar p)``.

    Keyed by (task, protocol, length or "all", method, budget); a win is a cell the anchor answers right
    and the other method wrong.
    """
    counts: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    cells = merge_cells(records)
    lengths = {cell["length"] for cell in cells.values()}
    for cell in cells.values():
        rows = cell["rows"]
        for (label, budget), row in rows.items():
            mine = rows.get((anchor, budget))
            if label == anchor or mine is None or row.get("error") or mine.get("error"):
                continue
            for task, length in itertools.product(_tasks(cell), [cell["length"]] + ([ALL] if len(lengths) > 1 else [])):
                entry = counts[(task, cell["protocol"], length, label, budget)]
                entry[0] += bool(mine["correct"]) and not row["correct"]
                entry[1] += bool(row["correct"]) and not mine["correct"]
    return {key: (w, l_, mcnemar_p(w, l_)) for key, (w, l_) in counts.items()}


def mcnemar_p(wins: int, losses: int) -> float:
    """Two-sided exact McNemar (sign) test on the discordant pairs."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _length_key(length) -> float:
    return math.inf if length == ALL else float(length)


def _table_row(key: tuple, items: list[tuple[dict, dict | None]]) -> dict[str, Any]:
    task, protocol, length, label, budget = key
    is_full = label == FULL
    ok = [(ref, row) for ref, row in items if is_full or row.get("error") is None]
    flags = [bool(ref["correct"] if is_full else row["correct"]) for ref, row in ok]
    full_flags = [bool(ref["correct"]) for ref, _ in ok]
    n, correct = len(flags), sum(flags)
    low, high = metrics.wilson_interval(correct, n)
    acc, full_acc = metrics.accuracy(flags), metrics.accuracy(full_flags)

    def mean(field: str) -> float | None:
        if is_full:
            return {"token_match": 1.0, "kl": 0.0, "recall": 1.0}.get(field)
        values = [row.get(field) for _, row in ok if row.get(field) is not None]
        return sum(values) / len(values) if values else None

    return {
        "task": task, "protocol": protocol, "length": length, "method": label, "budget": budget,
        "n": n, "correct": correct, "accuracy": acc, "ci_low": low, "ci_high": high,
        "full_accuracy": full_acc, "retention": 1.0 if is_full and n else metrics.retention(acc, full_acc),
        "score": _mean_score(ok, is_full),
        "token_match": mean("token_match"), "kl": mean("kl"), "recall": mean("recall"),
        "similarity": mean("similarity"), "cost": 1.0 if is_full else _mean_cost(ok), "errors": len(items) - len(ok),
        "recall_layers": None if is_full else _mean_lists([row.get("recall_layers") for _, row in ok]),
        "error_example": next((row["error"] for _, row in items if row and row.get("error")), None),
    }


def _mean_cost(items: list[tuple[dict, dict | None]]) -> float | None:
    """Mean of (prefill + compression) / prefill: the compressed prefill's time against a plain one's."""
    ratios = [
        (ref["prefill_seconds"] + row["compress_seconds"]) / ref["prefill_seconds"]
        for ref, row in items
        if ref.get("prefill_seconds") and row.get("compress_seconds") is not None
    ]
    return sum(ratios) / len(ratios) if ratios else None


def _mean_score(items: list[tuple[dict, dict | None]], is_full: bool) -> float | None:
    """Mean partial credit (share of the answers found; equals accuracy for single-answer tasks)."""
    scores = [(ref if is_full else row).get("score") for ref, row in items]
    scores = [s for s in scores if s is not None]
    return sum(scores) / len(scores) if scores else None


def _mean_lists(lists: list[list[float] | None]) -> list[float] | None:
    lists = [values for values in lists if values]
    if not lists:
        return None
    return [sum(column) / len(column) for column in zip(*lists, strict=False)]


def _b95_rows(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for row in table:
        if row["method"] != FULL:
            grouped[(row["task"], row["protocol"], row["length"], row["method"])].append(row)
    out = []
    for (task, protocol, length, method), rows in grouped.items():
        rows = sorted(rows, key=lambda r: budget_key(r["budget"]))
        order = list(range(len(rows)))
        best = metrics.b95(order, [r["retention"] for r in rows])
        out.append({
            "task": task, "protocol": protocol, "length": length, "method": method,
            "b95": rows[best]["budget"] if best is not None else None,
            "largest_budget": rows[-1]["budget"],
        })
    return out


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def write_summary(grid, out: Path, run_seconds: float = 0.0, cells_run: int = 0,
                  command: str | None = None) -> dict[str, Any]:
    """Write ``summary.json``, ``summary.csv``, ``summary.md`` and the plots from every record in ``out``;
    returns the summary. ``run_seconds`` and ``cells_run``: what the run that just ended did."""
    records = read_cells(out / CELLS_FILE)
    table, b95 = aggregate(records, [entry.name for entry in grid.method_entries()], list(grid.protocols))
    cells = merge_cells(records)
    timing = {
        "cells": len({record["cell"] for record in records}),
        "questions": len(cells),
        "cells_run_now": cells_run,
        "run_seconds_now": round(run_seconds, 1),
        "cell_seconds_total": round(sum(r["seconds"] for r in records), 1),
        "cell_seconds_mean": round(sum(r["seconds"] for r in records) / len(records), 2) if records else None,
    }
    summary = {"grid": grid.model_dump(mode="json"), "timing": timing, "table": table, "b95": b95}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    with (out / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*TABLE_FIELDS, "b95"], extrasaction="ignore")
        writer.writeheader()
        b95_of = {(r["task"], r["protocol"], r["length"], r["method"]): r["b95"] for r in b95}
        for row in table:
            writer.writerow({**row, "b95": b95_of.get((row["task"], row["protocol"], row["length"], row["method"]))})
    (out / "summary.md").write_text(markdown(grid, table, b95, timing, command, records))
    try:
        from kvpress_like.eval.plots import write_plots

        summary["plots"] = write_plots(table, cells, out)
    except ImportError:  # matplotlib is in the eval extra
        summary["plots"] = []
    return summary


def write_run_summary(grid, run: Run, command: str | None = None) -> dict[str, Any]:
    """:func:`write_summary` after :func:`kvpress_like.eval.runner.run_grid` returned ``run``."""
    return write_summary(grid, run.out, run.seconds, run.cells_run, command)


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def pct(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.{digits}f}"


def num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def markdown(grid, table: list[dict[str, Any]], b95: list[dict[str, Any]], timing: dict[str, Any],
             command: str | None = None, records: list[dict[str, Any]] | None = None,
             anchor: str | None = None) -> str:
    """The Markdown report: where the configuration comes from; B95 overview; per block accuracy (Wilson 95% CI)
    and retention; agreement metrics; the time per cell.

    Paired wins–losses compare ``anchor`` (default: the grid's first method) with every method in the blocks that
    show every metric; an ``anchor`` given explicitly gets them in every block.
    """
    lines = [f"# {grid.name}", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += [
        f"Model `{grid.model}` ({grid.dtype}); tasks {', '.join(t.name for t in grid.tasks)}; "
        f"protocols {', '.join(grid.protocols)}; answer prefix {'on' if grid.answer_prefix else 'off'}.",
        f"{timing['cells']} cells (sample × protocol"
        + (f"; {timing['questions']} questions, each context asked several" if timing["questions"] != timing["cells"]
           else "")
        + f"); {timing['cell_seconds_total']} s of cell time ({timing['cell_seconds_mean']} s per cell).",
        "",
        *provenance_lines(records or []),
        "Accuracy in %, with the Wilson 95% interval in brackets; n = samples per entry. Retention = method "
        "accuracy / full-cache accuracy on the same samples. B95 = smallest budget from which on retention "
        "stays ≥ 95% at every larger budget measured (— = not reached).",
        "",
    ]
    b95_of = {(r["task"], r["protocol"], r["length"], r["method"]): r["b95"] for r in b95}
    blocks: dict[tuple, list[dict]] = defaultdict(list)
    for row in table:
        blocks[(row["task"], row["protocol"], row["length"])].append(row)
    lines += _b95_overview(blocks, b95_of)
    order = [e.name for e in grid.method_entries() if not e.is_full]
    every_block = anchor is not None
    anchor = anchor or (order[0] if order else None)
    pairs = paired(records, anchor) if anchor and records else {}
    for (task, protocol, length), rows in blocks.items():
        budgets = sorted({r["budget"] for r in rows if r["method"] != FULL}, key=budget_key)
        full = next((r for r in rows if r["method"] == FULL), None)
        methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != FULL))
        cell = {(r["method"], r["budget"]): r for r in rows}
        title = f"{task} · {protocol} · {'all lengths' if length == ALL else f'{length} tokens'}"
        lines += [f"## {title}", ""]
        if full:
            lines += [
                f"Full cache: {pct(full['accuracy'])}% [{pct(full['ci_low'])}–{pct(full['ci_high'])}], "
                f"n = {full['n']}.", "",
            ]
        if not methods:  # a full-cache-only grid (e.g. can the model do the task at all?)
            lines.append("No compression method in this grid: the full cache's accuracy is the result.")
            lines.append("")
            continue
        header = ["| method | " + " | ".join(budgets) + " |", "| --- | " + " | ".join("---:" for _ in budgets) + " |"]
        lines += ["**Accuracy** (%); cost = (prefill + compression) / plain prefill, measured in the same run",
                  "", header[0][:-1] + "| B95 | cost |", header[1] + " ---: | ---: |"]
        for method in methods:
            entries = []
            for budget in budgets:
                r = cell.get((method, budget))
                if r is None or r["n"] == 0:
                    entries.append("n/a" if r is None or not r["errors"] else "error")
                else:
                    entries.append(f"{pct(r['accuracy'])} [{pct(r['ci_low'])}–{pct(r['ci_high'])}]")
            best = b95_of.get((task, protocol, length, method)) or "—"
            costs = [cell[(method, b)]["cost"] for b in budgets if cell.get((method, b), {}).get("cost") is not None]
            cost = f"{sum(costs) / len(costs):.2f}×" if costs else "–"
            lines.append(f"| {method} | " + " | ".join(entries) + f" | {best} | {cost} |")
        detailed = length == ALL or len({k[2] for k in blocks if k[:2] == (task, protocol)}) == 1
        metrics_shown = [("retention", "Retention (%)", pct)]
        if detailed:
            metrics_shown += [
                ("token_match", "Token match with the full-cache answer (%)", pct),
                ("kl", "Mean KL(full ‖ method) along the full-cache answer (nats)", lambda v: num(v, 3)),
                ("recall", "Attention recall: share of the true decoding attention on kept tokens (%)", pct),
            ]
        for metric, caption, render in metrics_shown:
            lines += ["", f"**{caption}**", "", *header]
            for method in methods:
                entries = [render(cell[(method, b)][metric]) if (method, b) in cell else "n/a" for b in budgets]
                lines.append(f"| {method} | " + " | ".join(entries) + " |")
        if (detailed or every_block) and pairs and anchor in methods:
            lines += ["", f"**{anchor} against each method on the same samples**: wins–losses (cells {anchor} answers "
                          "right and the other wrong – the reverse); * = exact McNemar p < 0.05", "", *header]
            for method in methods:
                if method == anchor:
                    continue
                entries = []
                for budget in budgets:
                    got = pairs.get((task, protocol, length, method, budget))
                    entries.append("n/a" if got is None else f"{got[0]}–{got[1]}{'*' if got[2] < 0.05 else ''}")
                lines.append(f"| {method} | " + " | ".join(entries) + " |")
        sims = {m: next((cell[(m, b)]["similarity"] for b in budgets if (m, b) in cell
                         and cell[(m, b)]["similarity"] is not None), None) for m in methods}
        if detailed and any(v is not None for v in sims.values()):
            lines += ["", "Attention similarity of each method's window with the true decoding attention "
                          "(cosine, mean over layers and heads; a property of the window, not of the budget): "
                      + ", ".join(f"{m} {num(v)}" for m, v in sims.items() if v is not None) + "."]
        errors = [(m, b, cell[(m, b)]) for m in methods for b in budgets if (m, b) in cell and cell[(m, b)]["errors"]]
        if errors:
            lines += ["", "Cells that could not run: " + "; ".join(
                f"{m} @ {b}: {r['errors']}× ({r['error_example']})" for m, b, r in errors[:6])]
        lines.append("")
    lines += _cell_time(records or [], list(grid.protocols))
    return "\n".join(lines)


def provenance_lines(records: list[dict[str, Any]]) -> list[str]:
    """Where the rows' pipeline configurations come from: recorded at run time, or backfilled and checked."""
    stamps = [record.get("provenance") or {} for record in records]
    backfilled = [stamp for stamp in stamps if "backfill" in stamp]
    at_run = [stamp for stamp in stamps if stamp and "backfill" not in stamp]
    lines = []
    if at_run:
        runs = sorted({f"{stamp['version']} at commit {stamp['commit'] or 'unknown'}" for stamp in at_run})
        lines.append(f"Configuration recorded at run time in every row of {len(at_run)} records, by kvpress_like "
                     + ", ".join(runs) + ".")
    for stamp in {json.dumps(p, sort_keys=True): p for p in backfilled}.values():
        check = stamp["check"]
        cells = ", ".join(f"`{cell}`" for cell in check["cells"])
        lines.append(
            f"Configuration **{stamp['config']}** by commit {stamp['backfill']['commit']} (these rows were recorded "
            "before runs stored it; the run's own commit is not known). Re-running "
            f"{cells} with " + ("that code" if check["rerun_by"]["commit"] == stamp["backfill"]["commit"]
                                 else f"the code of commit {check['rerun_by']['commit']}") + " gave the recorded "
            f"answers, correctness and kept budget tokens ({check['rows_compared']} rows compared) for "
            + ("" if FULL in check["differ"] else "the full-cache reference and ")
            + (", ".join(check["reproduced"]) or "no method")
            + (f"; **not reproduced: {', '.join(check['differ'])}** (their rows carry no configuration)"
               if check["differ"] else "") + "."
        )
    if len(at_run) + len(backfilled) < len(records):
        lines.append(f"{len(records) - len(at_run) - len(backfilled)} records carry no configuration (made before "
                     "runs recorded it).")
    return [*lines, ""] if lines else []


def _cell_time(records: list[dict[str, Any]], protocols: list[str]) -> list[str]:
    """Seconds per cell (one sample under one protocol, every method and budget), per length and protocol."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for record in records:
        groups[(record["length"], record["protocol"])].append(record["seconds"])
    if not groups:
        return []
    groups[(ALL, "all")] = [r["seconds"] for r in records]
    lines = ["## Cell time", "", "Seconds of one cell (a sample under one protocol, every method and budget), from "
             "the records", "", "| length | protocol | records | total s | mean s | min s | max s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    rank = {protocol: i for i, protocol in enumerate(protocols)}
    for (length, protocol), seconds in sorted(groups.items(), key=lambda kv: (_length_key(kv[0][0]),
                                                                              rank.get(kv[0][1], len(rank)))):
        lines.append(f"| {length} | {protocol} | {len(seconds)} | {sum(seconds):.1f} | "
                     f"{sum(seconds) / len(seconds):.1f} | {min(seconds):.1f} | {max(seconds):.1f} |")
    return [*lines, ""]


def _b95_overview(blocks: dict[tuple, list[dict]], b95_of: dict) -> list[str]:
    """One table: B95 of every method in every (task, protocol, length) block."""
    keys = list(blocks)
    if not keys:
        return []
    methods = list(dict.fromkeys(r["method"] for rows in blocks.values() for r in rows if r["method"] != FULL))
    titles = [f"{t} · {p} · {'all' if n == ALL else n}" for t, p, n in keys]
    lines = ["## B95 overview", "", "| method | " + " | ".join(titles) + " |",
             "| --- | " + " | ".join("---:" for _ in keys) + " |"]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(b95_of.get((*k, method)) or "—" for k in keys) + " |")
    full = [next((r for r in blocks[k] if r["method"] == FULL), None) for k in keys]
    lines.append("| *full cache accuracy* | " + " | ".join(
        f"{pct(r['accuracy'])}% (n={r['n']})" if r else "–" for r in full) + " |")
    return [*lines, ""]
