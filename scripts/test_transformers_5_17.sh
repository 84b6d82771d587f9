#!/usr/bin/env bash
# Run the core test files against transformers 5.17 (the `past_key_values` API) in a separate venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV_517:-.cache/venv-transformers-5.17}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install transformers==5.17.0 "pluggy>=1.5" "pydantic>=2.7" "pyyaml>=6" "pytest>=8" "hypothesis>=6.100"
"${PIP[@]}" install --no-deps -e .
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_reference_methods.py tests/test_head_adaptive.py \
    tests/test_union_window.py tests/test_chunk_selector.py tests/test_compatibility.py
