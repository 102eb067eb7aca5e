"""A monitor's settings (`monitors.NAME` in llmops.yaml) with their defaults, and where its store lives.

`MonitorSpec.from_dict` accepts the validated config mapping; every threshold is optional
and a check only raises alerts when its section is configured (metrics are always reported).
`drift.embedding_model` (a project-relative model folder, or `base_model` for the deployed
fine-tune's base model) turns on embedding drift; see `llmops.monitor.embedding`.
Alerts go to `webhook` (a URL written in llmops.yaml) or to the URL held by the environment
variable `webhook_env` names, read when the monitor runs (`webhook_url`), so the secret is
never in llmops.yaml or llmops.lock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from llmops.errors import ProviderError
from llmops.monitor.errors import MonitorError
from llmops.redact import redact_url

if TYPE_CHECKING:
    from llmops.providers.base import ProviderContext

DEFAULT_WINDOW = 1000
_DURATION = re.compile(r"^(\d+)(s|m|h|d)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Window:
    """Requests considered: the last `count` requests, or those of the last `seconds`."""

    count: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, value: Any, where: str) -> "Window":
        if isinstance(value, bool):
            raise MonitorError(f"{where}: window must be a count (1000) or a duration (24h), not {value!r}.")
        if isinstance(value, int) and value >= 1:
            return cls(count=value)
        if isinstance(value, str):
            m = _DURATION.match(value.strip())
            if m and int(m.group(1)) > 0:
                return cls(seconds=float(int(m.group(1)) * _UNIT[m.group(2)]))
        raise MonitorError(f"{where}: window {value!r} is not a positive count (1000) or a duration such as "
                           "30m, 24h, 7d; fix it in llmops.yaml.")

    def describe(self) -> str:
        if self.count is not None:
            return f"last {self.count} requests"
        secs = int(self.seconds or 0)
        for unit in ("d", "h", "m"):
            if secs % _UNIT[unit] == 0:
                return f"last {secs // _UNIT[unit]}{unit}"
        return f"last {secs}s"


@dataclass(frozen=True)
class MonitorSpec:
    """`monitors.NAME`; `None` thresholds are not checked."""

    name: str
    deployment: str
    window: Window
    drift_window: Window
    psi_max: float | None = None
    ks_max: float | None = None
    embedding_model: str | None = None  # project-relative model folder, or "base_model"
    embedding_max: float | None = None
    min_positive_rate: float | None = None
    min_feedback_count: int = 1
    p95_ms_max: float | None = None
    error_rate_max: float | None = None
    suspicious: bool = False
    rate_spike_factor: float = 10.0
    baseline_per_min: float = 1.0  # the least usual rate a client's busiest minute is compared with
    max_prompt_chars: int = 20000
    injection_max: int = 3
    log_text: bool = False
    store: str | None = None
    webhook: str | None = None  # written inline (the lock keeps only its scheme and host)
    webhook_env: str | None = None  # the environment variable holding the webhook URL (a secret)

    @classmethod
    def from_dict(cls, name: str, spec: dict[str, Any]) -> "MonitorSpec":
        where = f"monitors.{name}"
        window = Window.parse(spec.get("window", DEFAULT_WINDOW), f"{where}.window")
        drift = _section(spec, "drift", where)
        feedback = _section(spec, "feedback", where)
        latency = _section(spec, "latency", where)
        susp = spec.get("suspicious")
        sus = _section(spec, "suspicious", where)
        drift_window = Window.parse(drift["window"], f"{where}.drift.window") if "window" in drift else window
        if spec.get("webhook") and spec.get("webhook_env"):
            raise MonitorError(f"{where} sets both `webhook` and `webhook_env`; keep `webhook_env` (the URL stays "
                               "in the environment) and remove `webhook` from llmops.yaml.")
        return cls(
            name=name,
            deployment=str(spec.get("deployment") or name),
            window=window,
            drift_window=drift_window,
            psi_max=_num(drift.get("psi_max")),
            ks_max=_num(drift.get("ks_max")),
            embedding_model=_text(drift.get("embedding_model")),
            embedding_max=_num(drift.get("embedding_max")),
            min_positive_rate=_num(feedback.get("min_positive_rate")),
            min_feedback_count=int(feedback.get("min_count", 1)),
            p95_ms_max=_num(latency.get("p95_ms_max")),
            error_rate_max=_num(spec.get("error_rate_max")),
            suspicious=susp is not None,
            rate_spike_factor=float(sus.get("rate_spike_factor", 10.0)),
            baseline_per_min=float(sus.get("baseline_per_min", 1.0)),
            max_prompt_chars=int(sus.get("max_prompt_chars", 20000)),
            injection_max=int(sus.get("injection_max", 3)),
            log_text=bool(spec.get("log_text", False)),
            store=spec.get("store"),
            webhook=spec.get("webhook"),
            webhook_env=_text(spec.get("webhook_env")),
        )


def webhook_url(spec: MonitorSpec, environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """`(url, problem)`: the webhook to call (None when none is configured or it is unusable)
    and, when `webhook_env` does not hold a usable URL, what to fix."""
    if spec.webhook:
        return spec.webhook, None
    if not spec.webhook_env:
        return None, None
    url = (environ.get(spec.webhook_env) or "").strip()
    if not url:
        return None, (f"monitors.{spec.name}.webhook_env names {spec.webhook_env}, which is empty or not set; set "
                      "it to the webhook URL where `llmops monitor` runs")
    if not url.lower().startswith(("http://", "https://")):
        return None, (f"{spec.webhook_env} (monitors.{spec.name}.webhook_env) does not hold an http(s) URL; set it to "
                      "the webhook URL")
    return url, None


def _section(spec: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = spec.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MonitorError(f"{where}.{key} must be a mapping; fix it in llmops.yaml.")
    return value


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def _text(value: Any) -> str | None:
    return None if value is None or str(value).strip() == "" else str(value).strip()


def store_url(root: Path, name: str, store: str | None) -> str:
    """The store URL of monitor `name`: its `store:` (relative sqlite paths are relative to the
    project) or `sqlite:///.llmops/monitor/NAME.db`; always absolute for sqlite."""
    if not store:
        return "sqlite:///" + str((root / ".llmops" / "monitor" / f"{name}.db").resolve())
    if store.startswith(("postgresql://", "postgresql+", "postgres://")):
        return store
    if store.startswith("sqlite") and "://" in store:
        path = store.split("://", 1)[1]
        path = path[1:] if path.startswith("/") else path  # sqlite:///rel -> rel; sqlite:////abs -> /abs
        p = Path(path)
        return "sqlite:///" + str(p if p.is_absolute() else (root / p).resolve())
    raise MonitorError(f"store {redact_url(store)!r} is neither sqlite:///PATH nor postgresql://...; fix monitors.{name}.store.")


def recorded_store(root: Path, url: str) -> str:
    """The store as llmops.lock records it: no password, and a SQLite file inside the project
    relative to it (`sqlite:///.llmops/monitor/NAME.db`), so the lock holds no machine's path."""
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        base = root.resolve()
        if path.is_absolute() and path.is_relative_to(base):
            return "sqlite:///" + path.relative_to(base).as_posix()
    return redact_url(url)


@dataclass(frozen=True)
class ServedMonitor:
    """What a deployment's server needs from the monitor watching it."""

    name: str
    store: str  # full store URL (may hold a password: never record it as is)
    log_text: bool

    def settings(self) -> dict[str, Any]:
        """The request-log settings as a server's state file records them
        (`llmops.serve.endpoint.server_monitor`): the store without its password."""
        return {"store": redact_url(self.store), "log_text": self.log_text}


def monitor_deployment(name: str, spec: dict[str, Any] | None) -> str:
    return str((spec or {}).get("deployment") or name)


def serving_monitor(ctx: ProviderContext, deployment: str) -> ServedMonitor | None:
    """The monitor of `deployment` in the resolved llmops.yaml, or None when none watches it."""
    monitors = ctx.config.get("monitors") or {}
    names = sorted(n for n, spec in monitors.items() if monitor_deployment(n, spec) == deployment)
    if not names:
        return None
    if len(names) > 1:
        raise ProviderError(f"deployments.{deployment} is watched by monitors {', '.join(names)}; a server logs to "
                            "one request store, so keep one monitor per deployment in llmops.yaml.")
    spec = monitors[names[0]] or {}
    return ServedMonitor(names[0], store_url(ctx.root, names[0], spec.get("store")), bool(spec.get("log_text", False)))
