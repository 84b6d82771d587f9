"""Packaging: a non-editable wheel ships methods/ and scorers/ inside the kvpress_like namespace, the
installed package and the source tree both import, wherever Python runs from; ruff is clean."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder),
         str(ROOT)],
        check=True,
    )
    (built,) = folder.glob("kvpress_like-*.whl")
    return built


def test_wheel_installs_methods_and_scorers_inside_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "kvpress_like/methods/dapq.py" in names
    assert "kvpress_like/scorers/attention.py" in names
    assert "kvpress_like/eval/runner.py" in names
    assert not any(name.startswith(("methods/", "scorers/")) for name in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "kvpress-like = kvpress_like.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_non_editable_install_imports_from_the_repository_root_and_elsewhere(wheel, tmp_path, where):
    """Installed without ``-e``, the package runs anywhere; from the repository root the source folder
    ``kvpress_like/`` shadows it and must find ``methods/`` and ``scorers/`` next to it.

    ``python -S`` leaves out this environment's editable install (a ``.pth`` import hook), so only the
    non-editable copy (``--target``) and the dependencies (on ``PYTHONPATH``) are importable.
    """
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    code = (
        "import kvpress_like, kvpress_like.scorers.attention as scorer; from kvpress_like import build; "
        "print(build('dapq', budget=8).scorer.name, kvpress_like.__file__, scorer.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])}
    cwd = ROOT if where == "repository root" else tmp_path
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    name, package, module = result.stdout.split()
    home = ROOT if where == "repository root" else target
    assert name == "attention", result.stdout
    assert Path(package).is_relative_to(home) and Path(module).is_relative_to(home), result.stdout


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is not installed")
def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
