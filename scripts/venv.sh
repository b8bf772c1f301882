#!/usr/bin/env bash
# Create .venv once and reuse it; re-install the project only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[venv] creating .venv with $PY (first run only; torch makes this take a few minutes)"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, so that pip does not pick a different build for segmentation-models-pytorch.
  # On x86_64 Linux this matches the wheels cached on the development machines; elsewhere
  # pip picks whatever torch fits the platform.
  if [ "$(uname -sm)" = "Linux x86_64" ]; then
    .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" \
      || .venv/bin/python -m pip install -q torch torchvision
  else
    .venv/bin/python -m pip install -q torch torchvision
  fi
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "[venv] installing the project and its test dependencies"
  .venv/bin/python -m pip install -q -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
