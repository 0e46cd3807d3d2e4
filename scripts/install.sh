#!/usr/bin/env bash
# Create .venv and install af3dist into it. Idempotent: a second run installs nothing new.
# Without a GPU, a CPU build of torch goes in first so that resolving `torch` does not pull CUDA wheels;
# with one, torch is the ordinary install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" install "torch>=2.6"
  else
    "${PIP[@]}" install "torch==2.13.0" || "${PIP[@]}" install "torch>=2.6"
  fi
fi
"${PIP[@]}" install -e ".[test${AF3DIST_EXTRAS:+,$AF3DIST_EXTRAS}]"
