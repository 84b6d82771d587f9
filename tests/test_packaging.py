"""Packaging: a non-editable wheel ships methods/ and scorers/ inside the kvpress_like namespace; ruff is clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_methods_and_scorers_inside_the_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("kvpress_like-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "kvpress_like/methods/dapq.py" in names
    assert "kvpress_like/scorers/attention.py" in names
    assert "kvpress_like/eval/runner.py" in names
    assert not any(name.startswith(("methods/", "scorers/")) for name in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "kvpress-like = kvpress_like.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is not installed")
def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
