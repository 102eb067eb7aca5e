"""Alerts: the data type, where they are kept, and the webhook that receives them.

- Every monitor run appends its alerts to `.llmops/alerts.jsonl` (history, one JSON object
  a line) and replaces `.llmops/monitor/DEPLOYMENT.alerts.json` (the latest run's alerts,
  written atomically), which `open_alerts` reads for `llmops plan`: an empty latest run
  means the deployment's alerts are resolved.
- `send_webhook` POSTs a JSON body, retrying with exponential backoff; it never raises:
  the outcome (ok, attempts, error) is returned for the report. URLs are shown redacted
  to scheme://host because webhook paths often carry secrets.

Only the standard library is imported here, so `llmops plan` can call `open_alerts` cheaply.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from llmops.redact import redact_webhook

ALERTS_FILE = Path(".llmops") / "alerts.jsonl"


@dataclass(frozen=True)
class Alert:
    """One breached threshold. `message` reads e.g. "drift: PSI 0.31 > 0.2 on prompt length"."""

    deployment: str
    monitor: str
    check: str  # drift | feedback | latency | error_rate | suspicious
    metric: str  # e.g. drift.prompt_length.psi
    value: float | None
    threshold: float | None
    op: str  # the breached relation: value OP threshold
    message: str
    time: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Alert":
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})


def _state_file(root: Path, deployment: str) -> Path:
    return root / ".llmops" / "monitor" / f"{deployment}.alerts.json"


def record_alerts(root: Path, deployment: str, monitor: str, alerts: list[Alert], when: float) -> None:
    """Append `alerts` to the history and make them the deployment's open alerts."""
    history = root / ALERTS_FILE
    history.parent.mkdir(parents=True, exist_ok=True)
    if alerts:
        with history.open("a", encoding="utf-8") as fh:
            for alert in alerts:
                fh.write(json.dumps(alert.to_dict(), sort_keys=True) + "\n")
    state = {"deployment": deployment, "monitor": monitor, "time": when, "alerts": [a.to_dict() for a in alerts]}
    write_atomic(_state_file(root, deployment), json.dumps(state, indent=2, sort_keys=True) + "\n")


def open_alerts(root: Path, deployment: str) -> list[Alert]:
    """The alerts of the latest monitor run of `deployment` (empty if none or never monitored).

    A missing or unreadable state file counts as no alerts: the plan must not fail on it.
    """
    path = _state_file(Path(root), deployment)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        return [Alert.from_dict(a) for a in state.get("alerts", [])]
    except (OSError, ValueError, TypeError, AttributeError):
        return []


def send_webhook(url: str, payload: dict[str, Any], retries: int = 3, backoff: float = 0.5,
                 timeout: float = 5.0, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """POST `payload` as JSON; retry failures (connection errors, 5xx, 429) with backoff
    `backoff * 2**attempt`. Returns `{url, ok, attempts, status, error}`; never raises."""
    body = json.dumps(payload, sort_keys=True).encode("utf-8")
    result: dict[str, Any] = {"url": redact_webhook(url), "ok": False, "attempts": 0, "status": None, "error": None}
    for attempt in range(retries + 1):
        result["attempts"] = attempt + 1
        req = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "llmops-monitor"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                result.update(ok=True, status=resp.status, error=None)
                return result
        except urllib.error.HTTPError as exc:
            result.update(status=exc.code, error=f"HTTP {exc.code} {exc.reason}")
            if exc.code < 500 and exc.code != 429:  # the receiver refuses this body: retrying won't help
                return result
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            result.update(status=None, error=f"{type(exc).__name__}: {reason}")
        if attempt < retries:
            sleep(backoff * 2**attempt)
    return result


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temp file and `os.replace` (never half-written)."""
    from llmops.fsutil import atomic_write_text

    atomic_write_text(path, text)
