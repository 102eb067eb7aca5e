#!/usr/bin/env bash
# The test suite: offline, CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
