"""The example plugin in examples/ installs as a separate package and works without any change to the core.

The plugin is copied out of the tree, pip-installed (non-editable, ``--no-deps --no-build-isolation``)
into the running interpreter's environment, exercised in fresh subprocesses (entry points are read
when the plugin manager starts), and uninstalled afterwards, also when a check fails.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "examples" / "kvpress_like_example_plugin"
DISTRIBUTION = "kvpress-like-example-plugin"
METHOD, SCORER, ENTRY_POINT = "example_dapq_peak", "example_peak", "example"


def pip(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    if pip("--version").returncode != 0:
        pytest.skip("pip is not available in this interpreter's environment")
    source = tmp_path_factory.mktemp("plugin") / PLUGIN_DIR.name
    shutil.copytree(PLUGIN_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    result = pip("install", "-q", "--no-deps", "--no-build-isolation", str(source))
    assert result.returncode == 0, f"pip install of the example plugin failed:\n{result.stdout}\n{result.stderr}"
    try:
        yield source
    finally:
        pip("uninstall", "-y", "-q", DISTRIBUTION)


def run_python(code: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_installed_plugin_method_builds_and_compresses(installed_plugin, tmp_path):
    out = run_python(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import torch
        import kvpress_like_example_plugin
        from conftest import make_model
        from kvpress_like import build, list_parts
        from kvpress_like.cli import main

        where = kvpress_like_example_plugin.__file__
        assert "site-packages" in where and {str(PLUGIN_DIR)!r} not in where, "must be the installed copy: " + where
        catalog = list_parts()
        owners = {{m["name"]: m["plugin"] for m in catalog["method"]}}
        assert owners[{METHOD!r}] == {ENTRY_POINT!r}, owners
        assert {SCORER!r} in {{s["name"] for s in catalog["scorer"]}}

        model = make_model("llama")                        # tiny random Llama: 2 layers, 2 KV heads
        ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
        pipeline = build({METHOD!r}, budget=16)
        result = pipeline.prefill(model, ids)
        assert type(pipeline.scorer).__module__ == "kvpress_like_example_plugin.plugin"
        for kept in result.report.kept_indices.values():
            assert kept.shape == (1, 2, 16) and int(kept.max()) < 64
        assert result.cache.get_seq_length(0) == 64 and result.cache.physical_length(0) == 16
        main(["list"])
        """,
        cwd=tmp_path,
    )
    assert METHOD in out and SCORER in out


def test_plugin_own_tests_pass_against_the_installed_core(installed_plugin, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(installed_plugin / "tests")],
        cwd=installed_plugin, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
