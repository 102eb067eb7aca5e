#!/usr/bin/env bash
# The test suite: offline, CPU only. With no arguments, the whole suite runs on
# LLMOPS_TEST_WORKERS pytest-xdist workers (default 2), one test file per worker at a time
# (--dist loadfile: a file's tests share module fixtures and some build on each other), in
# collection order (tests/conftest.py puts the longest files first; xdist would sort by test count);
# the slowest tests are listed at the end. With arguments, pytest gets exactly those.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
# Bytecode caches (git-ignored __pycache__ folders in llmops/ and tests/) are written even where
# the environment sets PYTHONDONTWRITEBYTECODE: without them every xdist worker rewrites the asserts
# of every test module again (2.7 s CPU a worker) and each process the tests start compiles the
# llmops modules it imports.
unset PYTHONDONTWRITEBYTECODE
if [ "$#" -eq 0 ]; then
  exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${LLMOPS_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder \
    --durations=25 tests
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
