#!/usr/bin/env bash
# Creates .venv and installs expertscope with its test tools. Idempotent: a second run only checks.
# Torch: an already-installed torch is kept (install the build for your GPU first if you have one);
# otherwise torch==2.13.0 is installed, which on this project's CPU machines resolves to a local CPU build
# instead of a multi-GB CUDA download.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# -qq: pip's errors only (not the host's index warnings), so `make run` shows the project's own output.
PIP=("$VENV/bin/pip" --disable-pip-version-check)
stamp="$VENV/.expertscope-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  "${PIP[@]}" install -qq "torch==${EXPERTSCOPE_TORCH_VERSION:-2.13.0}"
fi
"${PIP[@]}" install -qq -c constraints.txt -e ".[dev]"
echo "$want" > "$stamp"
