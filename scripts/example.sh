#!/usr/bin/env bash
# Quick start, first command: set up, then plan and apply example-project/ on CPU with the
# embedded defaults (DVC local cache, MLflow on SQLite under .llmops/, local runner).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
cd example-project
../.venv/bin/llmops validate
../.venv/bin/llmops plan
../.venv/bin/llmops apply --auto-approve
