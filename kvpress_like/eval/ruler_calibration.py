"""Which RULER tasks a model's full cache solves: the calibration table of a full-cache grid, from its records.

    python -m kvpress_like.eval.ruler_calibration docs/results/ruler-calibration [--write]

A task stays in the leaderboard at a length where the full cache's RULER score (the mean of
:func:`kvpress_like.eval.ruler.string_match_all` over the samples, as the harness scores it) is at least 50 %;
the others are "beyond this model". The document is ``calibration.md`` beside the records; the command line is
taken from the grid's ``summary.md``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from kvpress_like.eval.metrics import wilson_interval
from kvpress_like.eval.records import CELLS_FILE, GRID_FILE, read_cells
from kvpress_like.eval.rerender import command_line

DOCUMENT = "calibration.md"
KEEP_AT = 0.5


def calibration(records: list[dict]) -> list[dict]:
    """One row per (task, length): samples, mean score, share fully right, mean answer tokens and cell seconds."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for record in records:
        groups[(record["task"], record["length"])].append(record)
    rows = []
    for (task, length), group in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        n = len(group)
        right = sum(bool(r["reference"]["correct"]) for r in group)
        score = sum(r["reference"]["score"] for r in group) / n
        rows.append({"task": task, "length": length, "n": n, "score": score, "right": right,
                     "interval": wilson_interval(right, n),
                     "answer_tokens": sum(r["reference"]["answer_tokens"] for r in group) / n,
                     "seconds": sum(r["seconds"] for r in group) / n, "keep": score >= KEEP_AT})
    return rows


def calibration_markdown(grid: dict, records: list[dict], command: str | None) -> str:
    rows = calibration(records)
    lines = [f"# RULER calibration: {grid['model']} (full cache)", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += [f"Model `{grid['model']}`; {len(records)} records (full cache, {', '.join(grid['protocols'])}); "
              f"seed {grid['seed']}.", "",
              "RULER score = mean over the samples of the share of reference answers in the full cache's answer "
              "(RULER's string_match_all, letter case kept, as the harness scores); all right = samples with every "
              "answer, with the Wilson 95% interval. A task is kept where the score is at least "
              f"{KEEP_AT:.0%}.", "", "## Full cache per task", "",
              "| task | length | n | RULER score (%) | all right (%) | answer tokens | s per sample | verdict |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        low, high = row["interval"]
        lines.append(f"| {row['task']} | {row['length']} | {row['n']} | {100 * row['score']:.1f} | "
                     f"{100 * row['right'] / row['n']:.0f} [{100 * low:.0f}–{100 * high:.0f}] | "
                     f"{row['answer_tokens']:.1f} | {row['seconds']:.1f} | "
                     f"{'keep' if row['keep'] else 'beyond this model'} |")
    lines += ["", "## Verdict", ""]
    for length in sorted({row["length"] for row in rows}):
        kept = [row["task"] for row in rows if row["length"] == length and row["keep"]]
        beyond = [row["task"] for row in rows if row["length"] == length and not row["keep"]]
        lines.append(f"At {length} tokens: kept {len(kept)} ({', '.join(kept) or 'none'}); beyond this model "
                     f"{len(beyond)} ({', '.join(beyond) or 'none'}).")
    seconds = sum(r["seconds"] for r in records)
    lines += ["", f"Cell time: {seconds:.0f} s in all ({seconds / 60:.1f} min), from the records.", ""]
    return "\n".join(lines)


def render(folder: Path) -> str:
    """``calibration.md`` of a results folder, from its ``grid.json`` and ``cells.jsonl``."""
    grid = json.loads((folder / GRID_FILE).read_text())["grid"]
    summary = folder / "summary.md"
    text = summary.read_text() if summary.is_file() else ""
    command = text.split("```bash\n", 1)[1].split("\n```", 1)[0] if "```bash\n" in text else None
    return calibration_markdown(grid, read_cells(folder / CELLS_FILE), command)


def main(argv: list[str] | None = None) -> None:
    command_line(__doc__, render, lambda folder: folder / DOCUMENT, argv=argv)


if __name__ == "__main__":
    main()
