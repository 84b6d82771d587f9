"""Figures of an ablation and of a benchmark (matplotlib, Agg backend).

Each kind of figure has one builder, and each ``*_figures`` generator yields ``(name stem, figure)`` for
one record. :func:`save` writes a figure to a path, PNG or SVG by its suffix (the ``eval`` and ``ablate``
commands write PNGs next to their records); :func:`svg` returns its SVG text, which is how the docs build
hook (``docs/hooks/figures.py``) draws the results pages' figures from the committed records.
"""

from __future__ import annotations

import io
import itertools
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from kvpress_like.eval.records import ALL, FULL, NO_BUDGET, budget_key

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Text drawn as paths (no font needed to view it) and element ids from a fixed salt: same record, same SVG.
SVG_STYLE = {"svg.fonttype": "path", "svg.hashsalt": "kvpress_like"}
BENCH_RATIOS = {
    "prefill_ratio": "prefill + compression time\n(ratio to the plain prefill)",
    "peak_ratio": "peak memory of the prefill\n(ratio to the plain prefill)",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def write_plots(table: list[dict[str, Any]], cells: dict[str, dict[str, Any]], out: Path) -> list[str]:
    """Write every plot of an ablation into ``out`` as PNG; returns the file names."""
    figures = itertools.chain(accuracy_figures(table), recall_figures(table), heatmap_figures(cells))
    return [save(figure, out / f"{stem}.png") for stem, figure in figures]


def save(figure: Figure, path: Path) -> str:
    """Write ``figure`` to ``path`` (PNG, SVG, … by the suffix) and close it; returns the file name."""
    _write(figure, path)
    return path.name


def svg(figure: Figure) -> str:
    """The SVG text of ``figure`` (closed afterwards), without a date: the same record gives the same text."""
    buffer = io.StringIO()
    _write(figure, buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


def _write(figure: Figure, target: Path | IO, **options: Any) -> None:
    plt = _pyplot()
    with plt.rc_context(SVG_STYLE):
        figure.savefig(target, bbox_inches="tight", **options)
    plt.close(figure)


def _by_task(table: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {task: [r for r in table if r["task"] == task] for task in sorted({r["task"] for r in table})}


def _drawn(stem: str, figure: Figure | None) -> Iterator[tuple[str, Figure]]:
    if figure is not None:
        yield stem, figure


# ------------------------------------------------------------------------------------------------
# Ablations (rows of summary.json's "table", cells merged from cells.jsonl)
# ------------------------------------------------------------------------------------------------


def accuracy_figures(table: list[dict[str, Any]]) -> Iterator[tuple[str, Figure]]:
    """Accuracy vs budget per task: ``accuracy_vs_budget_<task>``."""
    for task, rows in _by_task(table).items():
        yield from _drawn(f"accuracy_vs_budget_{task}", accuracy_vs_budget(rows))


def recall_figures(table: list[dict[str, Any]]) -> Iterator[tuple[str, Figure]]:
    """Attention recall per layer per task: ``recall_per_layer_<task>``."""
    for task, rows in _by_task(table).items():
        yield from _drawn(f"recall_per_layer_{task}", recall_per_layer(rows))


def heatmap_figures(cells: dict[str, dict[str, Any]]) -> Iterator[tuple[str, Figure]]:
    """Depth × length heatmaps per task and protocol of tasks with depths: ``heatmap_<task>_<protocol>``."""
    for task in sorted({c["task"] for c in cells.values()}):
        task_cells = {k: c for k, c in cells.items() if c["task"] == task}
        if any(c.get("depth") is not None for c in task_cells.values()):
            for protocol in dict.fromkeys(c["protocol"] for c in task_cells.values()):
                chosen = {k: c for k, c in task_cells.items() if c["protocol"] == protocol}
                yield from _drawn(f"heatmap_{task}_{protocol}", depth_length_heatmaps(chosen))


def _panels(table):
    protocols = list(dict.fromkeys(r["protocol"] for r in table))
    lengths = sorted({r["length"] for r in table}, key=lambda v: float("inf") if v == ALL else float(v))
    return protocols, lengths


def accuracy_vs_budget(table: list[dict[str, Any]]) -> Figure | None:
    """Accuracy (Wilson 95% CI) per method against the budget, one panel per protocol × length."""
    plt = _pyplot()
    protocols, lengths = _panels(table)
    budgets = sorted({r["budget"] for r in table if r["method"] != FULL}, key=budget_key)
    if not budgets:
        return None
    fig, axes = plt.subplots(len(protocols), len(lengths), figsize=(4.2 * len(lengths), 3.4 * len(protocols)),
                             squeeze=False, sharey=True, dpi=110)
    for i, protocol in enumerate(protocols):
        for j, length in enumerate(lengths):
            ax = axes[i][j]
            rows = [r for r in table if r["protocol"] == protocol and r["length"] == length]
            for method in dict.fromkeys(r["method"] for r in rows if r["method"] != FULL):
                points = sorted((r for r in rows if r["method"] == method), key=lambda r: budget_key(r["budget"]))
                xs = [budgets.index(r["budget"]) for r in points if r["n"]]
                ys = [100 * r["accuracy"] for r in points if r["n"]]
                # float rounding can put a Wilson bound a hair past the accuracy (e.g. 10/10): never below 0
                low = [max(0.0, 100 * (r["accuracy"] - r["ci_low"])) for r in points if r["n"]]
                high = [max(0.0, 100 * (r["ci_high"] - r["accuracy"])) for r in points if r["n"]]
                ax.errorbar(xs, ys, yerr=[low, high], marker="o", ms=3, capsize=2, lw=1.2, label=method)
            full = next((r for r in rows if r["method"] == FULL), None)
            if full and full["n"]:
                ax.axhline(100 * full["accuracy"], color="black", ls="--", lw=1, label="full cache")
            ax.set_xticks(range(len(budgets)), budgets, fontsize=8)
            ax.set_ylim(-3, 103)
            ax.set_title(f"{protocol} · {'all lengths' if length == ALL else f'{length} tok'}", fontsize=9)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("accuracy (%)")
            if i == len(protocols) - 1:
                ax.set_xlabel("budget (share of the prompt)")
    return _with_legend(fig, axes, bottom=0.04)


def _with_legend(fig: Figure, axes, bottom: float) -> Figure:
    """One shared legend under the panels."""
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, bottom + 0.03 * (len(labels) // 5), 1, 1))
    return fig


def recall_per_layer(table: list[dict[str, Any]]) -> Figure | None:
    """Attention recall per layer per method, one panel per protocol × budget (all lengths pooled)."""
    plt = _pyplot()
    protocols, lengths = _panels(table)
    length = ALL if ALL in lengths else lengths[-1]
    rows = [r for r in table if r["length"] == length and r.get("recall_layers")]
    budgets = sorted({r["budget"] for r in rows}, key=budget_key)
    if not rows:
        return None
    fig, axes = plt.subplots(len(protocols), len(budgets), figsize=(3.2 * len(budgets), 3 * len(protocols)),
                             squeeze=False, sharey=True, dpi=100)
    for i, protocol in enumerate(protocols):
        for j, budget in enumerate(budgets):
            ax = axes[i][j]
            for r in rows:
                if r["protocol"] == protocol and r["budget"] == budget:
                    ax.plot([100 * v for v in r["recall_layers"]], lw=1.1, label=r["method"])
            ax.set_title(f"{protocol} · {budget}", fontsize=9)
            ax.set_ylim(0, 102)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("attention recall (%)")
            if i == len(protocols) - 1:
                ax.set_xlabel("layer")
    return _with_legend(fig, axes, bottom=0.06)


def depth_length_heatmaps(cells: dict[str, dict[str, Any]]) -> Figure | None:
    """One small depth × length accuracy heatmap per (method, budget); the full cache in the first column."""
    plt = _pyplot()
    acc: dict[tuple, list[bool]] = defaultdict(list)
    for cell in cells.values():
        depth, length = cell.get("depth"), cell["length"]
        acc[(FULL, NO_BUDGET, depth, length)].append(bool(cell["reference"]["correct"]))
        for (label, budget), row in cell["rows"].items():
            if row.get("error") is None:
                acc[(label, budget, depth, length)].append(bool(row["correct"]))
    methods = list(dict.fromkeys(k[0] for k in acc if k[0] != FULL))
    budgets = sorted({k[1] for k in acc if k[0] != FULL}, key=budget_key)
    depths = sorted({k[2] for k in acc if k[2] is not None})
    lengths = sorted({k[3] for k in acc})
    if not methods or not depths:
        return None
    columns = ["full", *budgets]
    fig, axes = plt.subplots(len(methods), len(columns), figsize=(1.3 * len(columns) + 1, 1.25 * len(methods) + 0.8),
                             squeeze=False, dpi=100)
    image = None
    for i, method in enumerate(methods):
        for j, budget in enumerate(columns):
            ax = axes[i][j]
            key_method, key_budget = (FULL, NO_BUDGET) if budget == "full" else (method, budget)
            grid = [[_share(acc.get((key_method, key_budget, d, n))) for n in lengths] for d in depths]
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths] if i == len(methods) - 1 else [], fontsize=6)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths] if j == 0 else [], fontsize=6)
            if i == 0:
                ax.set_title(budget, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{method}\ndepth", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="accuracy (depth × length)")
    return fig


def _share(flags: list[bool] | None) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


# ------------------------------------------------------------------------------------------------
# Benchmarks (bench.json)
# ------------------------------------------------------------------------------------------------


def bench_figures(result: dict[str, Any]) -> Iterator[tuple[str, Figure]]:
    """Bars of each cost ratio of a benchmark record per method and prompt length: ``prefill_ratio``, ``peak_ratio``."""
    for field, label in BENCH_RATIOS.items():
        yield field, ratio_bars(result["rows"], field, label)


def ratio_bars(rows: list[dict[str, Any]], field: str, label: str) -> Figure:
    """Bars of ``field`` per method (x) and prompt length (colour), from the plain prefill's 1.0; n/a where null."""
    plt = _pyplot()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    value = {(r["method"], r["length"]): r.get(field) for r in rows}
    width = 0.8 / len(lengths)
    fig, ax = plt.subplots(figsize=(1.1 * len(methods) + 2, 3.8), dpi=110)
    for k, length in enumerate(lengths):
        xs = [i + (k - (len(lengths) - 1) / 2) * width for i, m in enumerate(methods) if (m, length) in value]
        ratios = [value[(m, length)] for m in methods if (m, length) in value]
        bars = ax.bar(xs, [0.0 if r is None else r - 1 for r in ratios], width, bottom=1.0, label=f"{length} tokens")
        ax.bar_label(bars, ["n/a" if r is None else f"{r:.2f}" for r in ratios], fontsize=6, rotation=90, padding=2)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.margins(y=0.15)
    ax.set_xticks(range(len(methods)), methods, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(label, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, frameon=False, ncol=len(lengths))
    fig.tight_layout()
    return fig
