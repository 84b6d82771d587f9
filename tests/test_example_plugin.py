"""The example plugins in examples/ install as separate packages and work without any change to the core.

``kvpress_like_example_plugin`` adds a scorer and a method; ``kvpress_like_example_adapter`` adds an
architecture (OLMo 2). Each is copied out of the tree, pip-installed (non-editable, ``--no-deps
--no-build-isolation``) into the running interpreter's environment, exercised in fresh subprocesses
(entry points are read when the plugin manager starts), and uninstalled afterwards, also when a check fails.
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
METHOD, SCORER, ENTRY_POINT = "example_dapq_peak", "example_peak", "example"
ADAPTER_DIR = ROOT / "examples" / "kvpress_like_example_adapter"


def pip(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def installed(example: Path, tmp_path_factory, distribution: str):
    """Install a copy of the ``example`` package for the duration of a module; yields the copy."""
    if pip("--version").returncode != 0:
        pytest.skip("pip is not available in this interpreter's environment")
    source = tmp_path_factory.mktemp("plugin") / example.name
    shutil.copytree(example, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    result = pip("install", "-q", "--no-deps", "--no-build-isolation", str(source))
    assert result.returncode == 0, f"pip install of {example.name} failed:\n{result.stdout}\n{result.stderr}"
    try:
        yield source
    finally:
        pip("uninstall", "-y", "-q", distribution)


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    yield from installed(PLUGIN_DIR, tmp_path_factory, "kvpress-like-example-plugin")


@pytest.fixture(scope="module")
def installed_adapter(tmp_path_factory):
    yield from installed(ADAPTER_DIR, tmp_path_factory, "kvpress-like-example-adapter")


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


@pytest.mark.parametrize("example", ["installed_plugin", "installed_adapter"])
def test_example_own_tests_pass_against_the_installed_core(example, request):
    source = request.getfixturevalue(example)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(source / "tests")],
        cwd=source, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_installed_adapter_adds_olmo2_to_every_method_and_the_compatibility_matrix(installed_adapter, tmp_path):
    out = run_python(
        f"""
        import torch
        import kvpress_like_example_adapter
        from kvpress_like import UnsupportedModelError, build
        from kvpress_like.plugins import get_adapter
        from kvpress_like.matrix import compatibility_matrix, render_markdown
        from kvpress_like.plugins import get_registry
        from kvpress_like.testing import ARCHITECTURES, attention_mismatch, make_gpt2, make_model

        where = kvpress_like_example_adapter.__file__
        assert "site-packages" in where and {str(ADAPTER_DIR)!r} not in where, "must be the installed copy: " + where
        registry = get_registry()
        assert registry.owners[("model_type", "olmo2")] == "example_olmo2", registry.owners
        assert "olmo2" in ARCHITECTURES and "llama" in ARCHITECTURES

        model = make_model("olmo2")                         # tiny random OLMo 2: 2 layers, 2 KV heads
        assert type(get_adapter(model)).__module__ == "kvpress_like_example_adapter.adapter"
        assert attention_mismatch("olmo2") < 1e-5          # the model's own attention, from recomputed queries
        ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(0))
        for method in ("dapq", "snapkv"):
            result = build(method, budget=48).prefill(model, ids)
            assert sorted(result.report.layers) == [0, 1], method
            for kept in result.report.kept_indices.values():
                assert kept.shape == (1, 2, 48) and int(kept.max()) < 96, method
            assert result.cache.get_seq_length(0) == 96 and result.cache.physical_length(0) == 48

        matrix = compatibility_matrix(["dapq", "snapkv"], ["llama", "olmo2"])
        assert {{status for (_, arch, _), status in matrix.items() if arch == "olmo2"}} == {{"ok"}}, matrix
        print(render_markdown(matrix))
        try:
            build("dapq", budget=8).prefill(make_gpt2(), ids)
        except UnsupportedModelError as error:
            print(error)
        """,
        cwd=tmp_path,
    )
    assert "| olmo2 sdpa | olmo2 eager |" in out and "OLMo 2 (olmo2)" in out
