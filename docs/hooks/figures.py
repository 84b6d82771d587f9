"""MkDocs hook: the results pages' figures are drawn from the committed records at every build.

A record under ``docs/results`` whose folder a results page links an SVG image in gets its figures as SVG
files of the site, next to the record, drawn by :mod:`kvpress_like.eval.plots` (the code that draws the
commands' PNGs):

- ``<folder>/summary.json`` (an ablation) → ``<folder>/accuracy_vs_budget_<task>.svg`` per task;
- ``<folder>/bench.json`` (a benchmark) → ``<folder>/prefill_ratio.svg`` and ``<folder>/peak_ratio.svg``.

Pages link them as ordinary images, e.g. ``![…](ablation/accuracy_vs_budget_single_needle.svg)`` from
``docs/results/needle-ablation.md``. No figure is a file in git, so a figure can never disagree with the record
next to it, and a link to a figure no record produces fails the strict build.
"""

from __future__ import annotations

import importlib.util
import json
import posixpath
import re
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

RESULTS = "results"
SVG_IMAGE = re.compile(r"!\[[^\]]*\]\(<?([^)\s>]+\.svg)")


def _drawers() -> dict[str, Callable[[dict[str, Any]], Iterator]]:
    """Record file name → the generator of its figures."""
    from kvpress_like.eval import plots

    return {"summary.json": lambda record: plots.accuracy_figures(record["table"]), "bench.json": plots.bench_figures}


def render(results: Path, folders: Collection[str] | None = None) -> dict[str, str]:
    """SVG text of every figure drawn from the records under ``results`` (only those in ``folders``, relative
    to ``results``, when given), by path relative to ``results``."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PluginError("the results pages' figures are drawn with matplotlib: pip install -e '.[eval]'")
    from kvpress_like.eval.plots import svg

    figures = {}
    for name, draw in _drawers().items():
        for record in sorted(results.rglob(name)):
            folder = record.parent.relative_to(results)
            if folders is not None and folder.as_posix() not in folders:
                continue
            try:
                figures_of = draw(json.loads(record.read_text()))
                drawn = {(folder / f"{stem}.svg").as_posix(): svg(figure) for stem, figure in figures_of}
            except (KeyError, TypeError, ValueError) as error:
                raise PluginError(f"cannot draw the figures of {record}: {error!r}") from error
            figures.update(drawn)
    return figures


def linked_folders(files) -> set[str]:
    """Folders, relative to ``results/``, of the SVG images that the results pages link."""
    folders = set()
    for page in files.documentation_pages():
        if page.src_uri.startswith(f"{RESULTS}/"):
            for link in SVG_IMAGE.findall(page.content_string):
                target = posixpath.normpath(posixpath.join(posixpath.dirname(page.src_uri), link))
                folders.add(posixpath.relpath(posixpath.dirname(target), RESULTS))
    return folders


def on_files(files, config):
    for name, text in render(Path(config.docs_dir) / RESULTS, linked_folders(files)).items():
        uri = f"{RESULTS}/{name}"
        if (stale := files.get_file_from_path(uri)) is not None:  # a local copy never hides the drawn figure
            files.remove(stale)
        files.append(File.generated(config, uri, content=text))
    return files
