"""Plots of an ablation (matplotlib, Agg backend): accuracy vs budget, depth × length heatmaps, recall per layer."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from kvpress_like.eval.runner import FULL, budget_key

ALL = "all"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(table: list[dict[str, Any]], cells: dict[str, dict[str, Any]], out: Path) -> list[str]:
    """Write every plot into ``out``; returns the file names."""
    files = []
    for task in sorted({r["task"] for r in table}):
        rows = [r for r in table if r["task"] == task]
        files.append(accuracy_vs_budget(rows, out / f"accuracy_vs_budget_{task}.png"))
        files.append(recall_per_layer(rows, out / f"recall_per_layer_{task}.png"))
        task_cells = {k: c for k, c in cells.items() if c["task"] == task}
        if any(c.get("depth") is not None for c in task_cells.values()):
            for protocol in dict.fromkeys(c["protocol"] for c in task_cells.values()):
                chosen = {k: c for k, c in task_cells.items() if c["protocol"] == protocol}
                files.append(depth_length_heatmaps(chosen, out / f"heatmap_{task}_{protocol}.png"))
    return [f for f in files if f]


def _panels(table):
    protocols = list(dict.fromkeys(r["protocol"] for r in table))
    lengths = sorted({r["length"] for r in table}, key=lambda v: float("inf") if v == ALL else float(v))
    return protocols, lengths


def accuracy_vs_budget(table: list[dict[str, Any]], path: Path) -> str | None:
    plt = _pyplot()
    protocols, lengths = _panels(table)
    budgets = sorted({r["budget"] for r in table if r["method"] != FULL}, key=budget_key)
    if not budgets:
        return None
    fig, axes = plt.subplots(len(protocols), len(lengths), figsize=(4.2 * len(lengths), 3.4 * len(protocols)),
                             squeeze=False, sharey=True)
    for i, protocol in enumerate(protocols):
        for j, length in enumerate(lengths):
            ax = axes[i][j]
            rows = [r for r in table if r["protocol"] == protocol and r["length"] == length]
            for method in dict.fromkeys(r["method"] for r in rows if r["method"] != FULL):
                points = sorted((r for r in rows if r["method"] == method), key=lambda r: budget_key(r["budget"]))
                xs = [budgets.index(r["budget"]) for r in points if r["n"]]
                ys = [100 * r["accuracy"] for r in points if r["n"]]
                low = [100 * (r["accuracy"] - r["ci_low"]) for r in points if r["n"]]
                high = [100 * (r["ci_high"] - r["accuracy"]) for r in points if r["n"]]
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
    return _save_with_legend(plt, fig, axes, path, bottom=0.04, dpi=110)


def _save_with_legend(plt, fig, axes, path: Path, bottom: float, dpi: int) -> str:
    """One shared legend under the panels, then save and close the figure."""
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, bottom + 0.03 * (len(labels) // 5), 1, 1))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path.name


def recall_per_layer(table: list[dict[str, Any]], path: Path) -> str | None:
    plt = _pyplot()
    protocols, lengths = _panels(table)
    length = ALL if ALL in lengths else lengths[-1]
    rows = [r for r in table if r["length"] == length and r.get("recall_layers")]
    budgets = sorted({r["budget"] for r in rows}, key=budget_key)
    if not rows:
        return None
    fig, axes = plt.subplots(len(protocols), len(budgets), figsize=(3.2 * len(budgets), 3 * len(protocols)),
                             squeeze=False, sharey=True)
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
    return _save_with_legend(plt, fig, axes, path, bottom=0.06, dpi=100)


def depth_length_heatmaps(cells: dict[str, dict[str, Any]], path: Path) -> str | None:
    """One small depth × length accuracy heatmap per (method, budget); the full cache in the first column."""
    plt = _pyplot()
    acc: dict[tuple, list[bool]] = defaultdict(list)
    for cell in cells.values():
        depth, length = cell.get("depth"), cell["length"]
        acc[(FULL, "100%", depth, length)].append(bool(cell["reference"]["correct"]))
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
                             squeeze=False)
    image = None
    for i, method in enumerate(methods):
        for j, budget in enumerate(columns):
            ax = axes[i][j]
            key_method, key_budget = (FULL, "100%") if budget == "full" else (method, budget)
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
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _share(flags: list[bool] | None) -> float:
    return sum(flags) / len(flags) if flags else float("nan")
