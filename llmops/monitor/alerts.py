"""Alerts: the data type, their state (open / resolved), and the webhook that receives them.

An alert is identified by its `key` (check, metric and, for a suspicious client, the client).
Each monitor run compares its alerts with the deployment's state file,
`.llmops/monitor/DEPLOYMENT.alerts.json` (written atomically):

- `alerts`: the alerts open now, each with `opened` (when it first opened); `open_alerts`
  reads them for `llmops plan`, so an empty run means the deployment's alerts are resolved.
- `sent`: the alerts as the webhook last received them. `notice_changes` diffs the run
  against it: an alert *opened* (new key), *changed* (its threshold or relation changed, or
  its value moved by `CHANGE_RATIO` or more of the value last sent) or *resolved* (a key
  sent as open and absent now). The webhook is called only when there is such a change, so
  a second run with nothing new calls nothing; `sent` moves only when a call succeeds, so a
  failed call is retried by the next run.

`.llmops/alerts.jsonl` keeps the history: one line per transition (`change`: opened,
changed or resolved), relative to the previous run's open alerts.

`send_webhook` POSTs a JSON body, retrying with exponential backoff; it never raises:
the outcome (ok, attempts, error) is returned for the report. URLs are shown redacted
to scheme://host because webhook paths often carry secrets.

Only the standard library is imported here, so `llmops plan` can call `open_alerts` cheaply.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from llmops.fsutil import atomic_write_text
from llmops.redact import redact_webhook

ALERTS_FILE = Path(".llmops") / "alerts.jsonl"
CHANGE_RATIO = 0.1  # an open alert's value moving by this share of the value last sent is news
OPEN, RESOLVED = "open", "resolved"


@dataclass(frozen=True)
class Alert:
    """One breached threshold. `message` reads e.g. "drift: PSI 0.31 > 0.2 on prompt length".

    `subject` tells apart alerts of one metric (the client of a suspicious-client alert);
    `state` is open, or resolved in a resolution notice; `opened` is when it first opened.
    """

    deployment: str
    monitor: str
    check: str  # drift | feedback | latency | error_rate | suspicious
    metric: str  # e.g. drift.prompt_length.psi
    value: float | None
    threshold: float | None
    op: str  # the breached relation: value OP threshold
    message: str
    time: float
    subject: str | None = None
    state: str = OPEN
    opened: float | None = None

    @property
    def key(self) -> str:
        return f"{self.check}:{self.metric}" + ("" if self.subject is None else f":{self.subject}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "key": self.key}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Alert":
        values = {k: data[k] for k in cls.__dataclass_fields__ if data.get(k) is not None}
        for name in _REQUIRED:  # an older or hand-edited file: read what is there
            values.setdefault(name, None)
        return cls(**values)


_REQUIRED = ("deployment", "monitor", "check", "metric", "value", "threshold", "op", "message", "time")


@dataclass
class AlertChanges:
    """Alerts opened, changed and resolved relative to an earlier set (the previous run's
    open alerts for the history, the last alerts sent for the webhook)."""

    opened: list[Alert] = field(default_factory=list)
    changed: list[Alert] = field(default_factory=list)
    resolved: list[Alert] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.opened or self.changed or self.resolved)

    def to_list(self) -> list[dict[str, Any]]:
        return [{"change": name, **a.to_dict()} for name, group in
                (("opened", self.opened), ("changed", self.changed), ("resolved", self.resolved)) for a in group]


def _state_file(root: Path, deployment: str) -> Path:
    return root / ".llmops" / "monitor" / f"{deployment}.alerts.json"


def _read_state(root: Path, deployment: str) -> dict[str, Any]:
    """The state file's content; {} when missing or unreadable (every alert is then news)."""
    try:
        state = json.loads(_state_file(Path(root), deployment).read_text(encoding="utf-8"))
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def _alert_list(state: dict[str, Any], key: str) -> list[Alert]:
    try:
        return [Alert.from_dict(d) for d in state.get(key) or []]
    except (TypeError, AttributeError):
        return []


def _alerts_of(state: dict[str, Any], key: str) -> dict[str, Alert]:
    return {a.key: a for a in _alert_list(state, key)}


def _moved(now: Alert, before: Alert) -> bool:
    if (now.threshold, now.op) != (before.threshold, before.op):
        return True
    if now.value is None or before.value is None:
        return now.value != before.value
    return abs(now.value - before.value) >= CHANGE_RATIO * abs(before.value) and now.value != before.value


def _diff(alerts: list[Alert], before: dict[str, Alert], when: float) -> AlertChanges:
    keys = {a.key for a in alerts}
    changes = AlertChanges()
    for alert in alerts:
        old = before.get(alert.key)
        if old is None:
            changes.opened.append(alert)
        elif _moved(alert, old):
            changes.changed.append(alert)
    changes.resolved = [replace(old, state=RESOLVED, time=when) for key, old in sorted(before.items())
                        if key not in keys]
    return changes


def record_alerts(root: Path, deployment: str, monitor: str, alerts: list[Alert],
                  when: float) -> tuple[list[Alert], AlertChanges]:
    """Make `alerts` the deployment's open alerts and append their transitions to the history.

    Returns `alerts` with `opened` set (kept from the previous run for an alert still open)
    and the transitions since the previous run."""
    root = Path(root)
    state = _read_state(root, deployment)
    before = _alerts_of(state, "alerts")
    alerts = [replace(a, opened=before[a.key].opened if a.key in before and before[a.key].opened else when)
              for a in alerts]
    changes = _diff(alerts, before, when)
    if changes:
        history = root / ALERTS_FILE
        history.parent.mkdir(parents=True, exist_ok=True)
        with history.open("a", encoding="utf-8") as fh:
            for entry in changes.to_list():
                fh.write(json.dumps(entry, sort_keys=True) + "\n")
    _write_state(root, deployment, {**state, "deployment": deployment, "monitor": monitor, "time": when,
                                    "alerts": [a.to_dict() for a in alerts]})
    return alerts, changes


def notice_changes(root: Path, deployment: str, alerts: list[Alert], when: float) -> AlertChanges:
    """What changed since the webhook's last successful call (all open alerts if never called)."""
    return _diff(alerts, _alerts_of(_read_state(Path(root), deployment), "sent"), when)


def mark_sent(root: Path, deployment: str, alerts: list[Alert]) -> None:
    """Record that the webhook now knows `alerts` as the open ones."""
    root = Path(root)
    state = _read_state(root, deployment)
    _write_state(root, deployment, {**state, "sent": [a.to_dict() for a in alerts]})


def _write_state(root: Path, deployment: str, state: dict[str, Any]) -> None:
    atomic_write_text(_state_file(root, deployment), json.dumps(state, indent=2, sort_keys=True) + "\n")


def open_alerts(root: Path, deployment: str) -> list[Alert]:
    """The alerts open after the latest monitor run of `deployment` (empty if none or never monitored).

    A missing or unreadable state file counts as no alerts: the plan must not fail on it.
    """
    return _alert_list(_read_state(Path(root), deployment), "alerts")


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


