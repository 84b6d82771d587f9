"""The tables of the results pages, regenerated from the records they are taken from.

    python -m kvpress_like.eval.pages docs/results/research.md [...] [--write]

A table on a results page stands between two comments; the first says where it comes from::

    <!-- table source="research/main/summary.md" section="single_needle · question_aware · 1024 tokens"
         caption="Accuracy" rows="snapkv, dapq" columns="10%, 20%" -->

    | method | 10% | 20% |
    ...

    <!-- /table -->

``source`` is a results folder's document, relative to the page: a ``summary.md``, ``probe.md`` or benchmark
document (:data:`kvpress_like.eval.rerender.DOCUMENTS`) is rendered again from the folder's records
(:func:`kvpress_like.eval.rerender.render_folder`; ``anchor="method"`` renders
the paired wins–losses against that method, in every block); any other file is read as written (the output of
a command that keeps no other record). ``section`` is the start of a heading's text, ``caption`` the start of the
paragraph the table follows in that section (omitted: the section's first table). ``rows`` keeps those rows, in
that order, by their first cell; ``columns`` keeps the first column and those, by header. A paragraph instead of a
table: ``paragraph="Configuration"`` (the section's first paragraph starting so).

Tests check that every such table equals its regeneration and that no page holds a numeric table without a
source; ``--write`` rewrites the tables of stale pages.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from kvpress_like.errors import ConfigError

MARKED = re.compile(r"^(?P<open><!-- table (?P<attrs>.*?)-->)\n(?P<body>.*?)^(?P<close><!-- /table -->)$", re.M | re.S)
ATTRIBUTE = re.compile(r'(\w+)="([^"]*)"')
HEADING = re.compile(r"^(#+) (.*)$")
NUMBER = re.compile(r"[\d\s.,:%×–—\-+*/±()]*\d[\d\s.,:%×–—\-+*/±()]*[a-zA-Z]{0,3}")  # "0 [0–20]", "1.03×", "46.9 min"


@functools.cache
def _source_text(path: Path, anchor: str | None) -> str:
    from kvpress_like.eval.rerender import document, render_folder

    if document(path.parent) == path and (path.name != "summary.md" or (path.parent / "grid.json").is_file()):
        return render_folder(path.parent, anchor)
    if anchor:
        raise ConfigError(f"{path}: anchor= needs a results folder's summary.md")
    return path.read_text()


def regenerate(page: Path, attrs: str) -> str:
    """The table (or paragraph) that the marker attributes ``attrs`` on ``page`` name, from its source."""
    options = dict(ATTRIBUTE.findall(attrs))
    source = (page.parent / options["source"]).resolve()
    if not source.is_file():
        raise ConfigError(f"{page}: table source {options['source']!r} does not exist")
    lines = _section(_source_text(source, options.get("anchor")).splitlines(), options.get("section"), source)
    if "paragraph" in options:
        found = _block(lines, options["paragraph"], table=False)
        if found is None:
            raise ConfigError(f"{page}: no paragraph starting {options['paragraph']!r} in {source}")
        return "\n".join(found)
    table = _block(lines, options.get("caption"), table=True)
    if table is None:
        where = f"{options.get('caption')!r} in {options.get('section')!r}"
        raise ConfigError(f"{page}: no table after {where} of {source}")
    return "\n".join(_select(table, _names(options.get("rows")), _names(options.get("columns")), page))


def _names(value: str | None) -> list[str] | None:
    return [name.strip() for name in value.split(",")] if value else None


def _section(lines: list[str], start: str | None, source: Path) -> list[str]:
    if start is None:
        return lines
    for i, line in enumerate(lines):
        heading = HEADING.match(line)
        if heading and heading.group(2).startswith(start):
            level = len(heading.group(1))
            end = next((j for j in range(i + 1, len(lines)) if (h := HEADING.match(lines[j]))
                        and len(h.group(1)) <= level), len(lines))
            return lines[i + 1:end]
    raise ConfigError(f"{source} has no section starting {start!r}")


def _block(lines: list[str], caption: str | None, table: bool) -> list[str] | None:
    """The first table (after the paragraph starting with ``caption``), or that paragraph itself."""
    after = caption is None
    for i, line in enumerate(lines):
        if not after and line.lstrip("*").startswith(caption or ""):
            if not table:
                return lines[i:next((j for j in range(i, len(lines)) if not lines[j].strip()), len(lines))]
            after = True
        elif after and table and line.startswith("|"):
            return lines[i:next((j for j in range(i, len(lines)) if not lines[j].startswith("|")), len(lines))]
    return None


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _select(table: list[str], rows: list[str] | None, columns: list[str] | None, page: Path) -> list[str]:
    header, rule, *body = table
    keep = list(range(len(_cells(header))))
    if columns:
        names = _cells(header)
        missing = [c for c in columns if c not in names]
        if missing:
            raise ConfigError(f"{page}: no column {missing} (columns: {names})")
        keep = [0] + [names.index(c) for c in columns]
    if rows:
        by_name = {_cells(line)[0]: line for line in body}
        missing = [r for r in rows if r not in by_name]
        if missing:
            raise ConfigError(f"{page}: no row {missing} (rows: {list(by_name)})")
        body = [by_name[r] for r in rows]
    return ["| " + " | ".join(_cells(line)[k] for k in keep) + " |" for line in [header, rule, *body]]


def render_page(page: Path) -> str:
    """``page`` with every marked table regenerated from its source."""
    text = page.read_text()
    return MARKED.sub(lambda m: f"{m['open']}\n\n{regenerate(page, m['attrs'])}\n\n{m['close']}", text)


def unsourced_tables(text: str) -> list[str]:
    """The first line of every table in ``text`` that holds numbers but no marker naming its source."""
    bare = MARKED.sub("", text)
    found, table = [], []
    for line in [*bare.splitlines(), ""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table and any(_numeric(cell) for row in table[2:] for cell in _cells(row)):
            found.append(table[0])
        table = []
    return found


def _numeric(cell: str) -> bool:
    return NUMBER.fullmatch(re.sub(r"\[[^\]]*\]", "", cell)) is not None


def main(argv: list[str] | None = None) -> None:
    from kvpress_like.eval.rerender import command_line

    def note(text: str) -> str:
        bare = unsourced_tables(text)
        return f"; tables without a source: {bare}" if bare else ""

    command_line(__doc__, render_page, note=note, argv=argv)


if __name__ == "__main__":
    main()
