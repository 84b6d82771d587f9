"""Make ``kvpress_like.methods`` and ``kvpress_like.scorers`` importable from a source checkout.

In the repository ``methods/`` and ``scorers/`` sit next to the ``kvpress_like/`` folder; installing moves
them inside (setuptools ``package-dir``). When the source folder is the one imported (an editable
install, or any run from the repository root, where it shadows an installed copy), they are loaded from
next to it, so every way of running the code sees the same package. Importing this module does it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
SUBPACKAGES = ("methods", "scorers")


def attach_source_subpackages() -> None:
    """Load each subpackage that is not inside the package from the folder of the same name next to it."""
    package = sys.modules[__package__]
    for name in SUBPACKAGES:
        init = PACKAGE.parent / name / "__init__.py"
        if (PACKAGE / name).is_dir() or not init.is_file() or hasattr(package, name):
            continue  # installed (the subpackage is inside), or already attached
        spec = importlib.util.spec_from_file_location(
            f"{__package__}.{name}", init, submodule_search_locations=[str(init.parent)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(package, name, module)


attach_source_subpackages()
