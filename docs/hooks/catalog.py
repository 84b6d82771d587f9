"""MkDocs hook: the methods catalog is generated from the registry at every build.

``docs/methods.md`` holds the prose and one marker line, ``<!-- catalog -->``. This hook replaces the
marker with tables built from :func:`kvpress_like.list_parts`, so a newly registered method or part
(built in, or from an installed plugin) appears on the next build without editing the docs.

It also stands in for the Results page while ``docs/results/index.md`` has not been written yet, so
the navigation never points at a missing page.
"""

from __future__ import annotations

from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

MARKER = "<!-- catalog -->"
CATALOG_PAGE = "methods.md"
RESULTS_PAGE = "results/index.md"
KINDS = {"window": "Window builders", "scorer": "Scorers", "allocator": "Allocators", "selector": "Selectors"}
KNOWN_METHOD_KEYS = {"name", "summary", "paper", "departures", "plugin", *KINDS}

RESULTS_PLACEHOLDER = """# Results

No measured results have been published in this build yet. They will appear here, with the commands
that produced them, once `docs/results/index.md` exists. Until then, run the demo yourself:

```bash
.venv/bin/kvpress-like demo
```
"""


def on_files(files, config):
    if files.get_file_from_path(RESULTS_PAGE) is None:
        files.append(File.generated(config, RESULTS_PAGE, content=RESULTS_PLACEHOLDER))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != CATALOG_PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"{CATALOG_PAGE} lost its {MARKER!r} line: the generated catalog has nowhere to go")
    return markdown.replace(MARKER, render_catalog())


# ------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------


def render_catalog() -> str:
    from kvpress_like import list_parts
    from kvpress_like.plugins import supported_model_types

    catalog = list_parts()
    methods = catalog["method"]
    architectures = ", ".join(sorted(set(supported_model_types().values())))
    lines = [
        f"*{len(methods)} methods and {sum(len(catalog[k]) for k in KINDS)} parts are registered in this build.* "
        f"Every method runs on the supported architectures: {architectures}.",
        "",
        "## Methods at a glance",
        "",
        "| method | window | scorer | allocator | selector |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method in methods:
        cells = [f"[`{method['name']}`](#{anchor(method['name'])})"]
        cells += [f"`{method[kind]['name']}`" for kind in KINDS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Methods in detail", ""]
    for method in methods:
        lines += render_method(method)
    for kind, title in KINDS.items():
        lines += render_parts(title, catalog[kind])
    return "\n".join(lines)


def render_method(method: dict[str, Any]) -> list[str]:
    lines = [f"### `{method['name']}` {{ #{anchor(method['name'])} }}", "", cell(method.get("summary") or ""), ""]
    facts = []
    if method.get("paper"):
        facts.append(f"**Paper**: {cell(method['paper'])}")
    if method.get("departures"):
        facts.append(f"**Departures from the paper**: {cell(method['departures'])}")
    facts.append(f"**Compatibility**: {compatibility(method['name'])}")
    facts.append(f"**Registered by**: `{method.get('plugin', '?')}`")
    for key, value in method.items():
        if key not in KNOWN_METHOD_KEYS and value not in (None, "", [], {}):
            facts.append(f"**{key.replace('_', ' ').capitalize()}**: {cell(value)}")
    lines += [f"- {fact}" for fact in facts]
    lines += ["", "| part | name | options (method defaults merged into the part's defaults) |", "| --- | --- | --- |"]
    config = resolved_config(method["name"])
    for kind in KINDS:
        choice = method[kind]
        options = config[kind] if config else {"name": choice["name"], **choice["options"]}
        shown = ", ".join(f"`{k}={v!r}`" for k, v in options.items() if k != "name") or "—"
        lines.append(f"| {kind} | [`{choice['name']}`](#{anchor(kind + '-' + choice['name'])}) | {cell(shown)} |")
    lines.append("")
    return lines


def render_parts(title: str, parts: list[dict[str, Any]]) -> list[str]:
    kind = next(k for k, t in KINDS.items() if t == title)
    lines = [f"## {title}", "", "| name | what it does | options: default — meaning | plugin |"]
    lines.append("| --- | --- | --- | --- |")
    for part in parts:
        options = "<br>".join(
            f"`{field}` = `{show_default(info['default'])}` — {info['description'] or ''}".rstrip(" —")
            for field, info in part["options"].items()
        )
        name = f"<span id=\"{anchor(kind + '-' + part['name'])}\"></span>`{part['name']}`"
        lines.append(f"| {name} | {cell(part['summary'])} | {cell(options) or '—'} | `{part['plugin']}` |")
    lines.append("")
    return lines


def build_default(name: str):
    """The method built as a user would: with a budget, unless its allocator takes none."""
    from kvpress_like import build
    from kvpress_like.plugins import get_registry

    registry = get_registry()
    allocator = registry.part_class("allocator", registry.method(name).allocator.name)
    return build(name, budget=1) if getattr(allocator, "uses_budget", True) else build(name)


def resolved_config(name: str) -> dict[str, Any] | None:
    """The method's fully resolved part options, or None when it cannot be built without more input."""
    try:
        return build_default(name).config
    except Exception:  # a method that needs more than a budget still gets a catalog entry
        return None


def compatibility(name: str) -> str:
    """Which protocol the method supports and what its window adds to the prefill, found by probing it."""
    import torch

    from kvpress_like.errors import UnsupportedInputError

    try:
        pipeline = build_default(name)
    except Exception as error:  # reported on the page instead of failing the build
        return f"could not be built from its defaults ({cell(error)})"
    notes = []
    if getattr(pipeline.allocator, "uses_budget", True) is False:
        notes.append("takes no budget (keeps every prompt token)")
    try:
        plan = pipeline.window.plan(torch.arange(64).unsqueeze(0))
    except UnsupportedInputError:
        notes.append("question-aware only: needs the question's span inside the prompt")
        return "; ".join(notes)
    notes.append("question-aware and query-agnostic")
    if plan.n_appended:
        notes.append(f"appends {plan.n_appended} rows to the prefill, dropped after scoring")
    elif len(plan.window_rows) == 0:
        notes.append("uses no query rows")
    return "; ".join(notes)


def show_default(value: Any) -> str:
    text = repr(value)
    return "required" if text == "PydanticUndefined" else text


def anchor(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")
