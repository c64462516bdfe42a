#!/usr/bin/env bash
# Sets up .venv with everything vqgpt needs. Idempotent: a second run installs nothing new.
#   bash setup.sh            # then: .venv/bin/python train.py   or   .venv/bin/python -m pytest
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch                  # CUDA build from the default index
  else
    # CPU-only machine: a pinned CPU build (a plain `torch` would pull several GB of CUDA libraries).
    python -m pip install -q torch==2.13.0 || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps --no-build-isolation -e .
