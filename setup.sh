#!/usr/bin/env bash
# Sets up .venv with everything vqgpt needs, at the versions the tests passed with (constraints.txt).
# Idempotent: a second run installs nothing new.
#   bash setup.sh            # then: .venv/bin/python train.py   or   .venv/bin/python -m pytest
# Only part of it: pip install '.[inference]' (sampling), '.[train]', '.[app]' (the web demo); see README "Install".
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
TORCH=$(sed -n 's/^torch==//p' constraints.txt)  # the tested release
CPU_INDEX=https://download.pytorch.org/whl/cpu
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q "torch==$TORCH"        # a CUDA build from the default index
  else
    # No NVIDIA driver: the CPU build from PyTorch's CPU index (a plain `pip install torch` on Linux pulls several
    # GB of CUDA libraries), if that index answers within 10 s; else (or if that install fails) the pinned wheel
    # from the default index: a CPU build on macOS and Windows, or a local file where pip is configured with one.
    # (Left to pip, an unreachable index costs minutes of retries for every package.)
    if python -c "import urllib.request as u; u.urlopen('$CPU_INDEX/torch/', timeout=10)" 2>/dev/null; then
      python -m pip install -q --timeout 30 --index-url "$CPU_INDEX" "torch==$TORCH" || python -m pip install -q "torch==$TORCH"
    else
      echo "setup.sh: $CPU_INDEX is unreachable: torch==$TORCH from the default index"
      python -m pip install -q "torch==$TORCH"
    fi
  fi
fi
python -m pip install -q -c constraints.txt -r requirements.txt
python -m pip install -q --no-deps --no-build-isolation -e .
