"""Where a result came from: the package version and the commit it was run from (records, trained artifacts)."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path


@functools.cache
def provenance() -> dict[str, str | None]:
    """The package version and, in a git checkout, the commit the code was run from (``+dirty`` if modified)."""
    from kvpress_like import __version__  # the package's __init__ imports the whole core: only when asked

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"version": __version__, "commit": None}
    return {"version": __version__, "commit": commit + ("+dirty" if dirty else "")}

