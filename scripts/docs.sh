#!/usr/bin/env bash
# Build the documentation site into ./site with `mkdocs build --strict` (offline).
# Assumes ./.venv from scripts/setup.sh; adds the docs extra (pinned by requirements/constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    echo "no .venv: run 'bash scripts/setup.sh' first" >&2
    exit 1
fi
# Install the docs extra unless every pin of it is already satisfied (a reinstall is slow and needless).
if ! .venv/bin/python - <<'PY' 2>/dev/null; then
import importlib.metadata as metadata
import tomllib

with open("pyproject.toml", "rb") as file:
    extra = tomllib.load(file)["project"]["optional-dependencies"]["docs"]
for requirement in extra:
    name, _, version = requirement.partition("==")
    assert version and metadata.version(name.split("[")[0]) == version, requirement
PY
    .venv/bin/python -m pip --disable-pip-version-check -q install -c requirements/constraints.txt -e ".[docs]"
fi
NO_MKDOCS_2_WARNING=1 .venv/bin/python -m mkdocs build --strict "$@"
echo "docs built: site/index.html"
