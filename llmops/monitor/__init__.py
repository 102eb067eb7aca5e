"""Monitoring of deployed models: request/feedback store, drift and alerts, reports.

- `store`: the append-only request store (SQLite WAL by default, `postgres` for PostgreSQL)
  with a background batch writer; a store is itself the server's `on_request` hook.
  `backend`: `RequestStore`, the interface and batch writer both backends share.
- `records`: what is derived from one request at write time (lengths, hashed token bag,
  injection patterns) so texts are kept only with `log_text: true`.
- `feedback`: `parse_feedback` for `POST /v1/feedback` bodies, `export_feedback` to JSONL.
- `drift`: PSI / KS and the training-data reference; `suspicious`: suspicious clients.
- `embedding`: embedding drift (`TransformersEmbedder`, the cached training-side embeddings).
- `runner`: `run_monitor` -> `MonitorReport`; `alerts`: `Alert`, `open_alerts`, the webhook.
- `report_html`: `write_html_report` (SVG charts from `llmops.charts`).

Nothing here prints or imports the CLI. Names are loaded lazily so importing this package
(e.g. `open_alerts` during `llmops plan`) does not import numpy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Alert": "alerts", "open_alerts": "alerts", "send_webhook": "alerts",
    "MonitorError": "errors", "StoreError": "errors", "FeedbackError": "errors",
    "BadFeedbackError": "errors", "UnknownRequestError": "errors",
    "Feedback": "feedback", "parse_feedback": "feedback", "export_feedback": "feedback",
    "client_id": "records",
    "TransformersEmbedder": "embedding",
    "MonitorSpec": "spec", "Window": "spec", "store_url": "spec",
    "RequestStore": "backend", "SqliteStore": "store", "open_store": "store",
    "MonitorReport": "runner", "run_monitor": "runner",
    "write_html_report": "report_html",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llmops.monitor' has no attribute {name!r}")
    return getattr(importlib.import_module(f"llmops.monitor.{module}"), name)
