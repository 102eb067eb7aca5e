#!/usr/bin/env bash
# Create .venv and install llmops with its test extras. torch is pinned to the CPU wheel
# (2.13.0) so no multi-GB CUDA build is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
# The distribution was called `llmops` before it became `llmops-gitops`, and `llmops` on PyPI is
# an unrelated package: a .venv that holds either loses it first (removed after the install, it
# would take the `llmops` script both record with it).
if .venv/bin/python -m pip show -q llmops >/dev/null 2>&1; then
  .venv/bin/python -m pip uninstall -y -q --disable-pip-version-check llmops
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import llmops, torch; print('llmops', llmops.__version__, 'torch', torch.__version__)"
