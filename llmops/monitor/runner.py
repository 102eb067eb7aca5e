"""`run_monitor`: one pass of a monitor over its window of logged requests.

It computes traffic (count, error rate: every answer with a status >= 400 -- a refused
request failed for its client -- or cut off without a status; 4xx and 5xx are also reported
apart), latency p50/p95, feedback (one rating per response and client counts, the latest;
positive rate, share of requests rated), drift against the training split (embedding drift
in `llmops.monitor.embedding`) and suspicious clients; compares them with the thresholds of
`monitors.NAME`; records the alerts and their state (`alerts.record_alerts`) and POSTs to the
webhook only what it has not been told (opened, changed, resolved; `alerts.notice_changes`).
Counting and grouping run in SQL; percentiles and drift in numpy over rows streamed in
batches (`RequestStore.scan`): memory stays bounded by a batch plus 8 bytes per latency, however
many requests the window holds. Prompt lengths are counted per distinct value in SQL.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from llmops.monitor.alerts import Alert, AlertChanges, mark_sent, notice_changes, record_alerts, send_webhook
from llmops.monitor.drift import Reference
from llmops.monitor.records import TOKEN_BUCKETS
from llmops.monitor.embedding import CACHE_DIR as EMBEDDING_CACHE_DIR
from llmops.monitor.embedding import Embed, embedding_drift, load_embedder, training_sample
from llmops.monitor.feedback import LATEST_FEEDBACK_SQL
from llmops.monitor.spec import MonitorSpec, Window, store_url, webhook_url
from llmops.monitor.store import RequestStore, open_store
from llmops.monitor.suspicious import find_suspicious
from llmops.redact import redact_url

MIN_DRIFT_REQUESTS = 30
MAX_SUSPICIOUS_ALERTS = 10
MAX_EMBED_TEXTS = 2000  # the window's most recent logged prompts that are embedded
# A failed request: answered with 4xx/5xx (the server logs its refusals with their status),
# or cut off without a status (client gone, handler crashed).
FAILED_SQL = "(status >= 400 OR (status IS NULL AND error IS NOT NULL))"


@dataclass
class MonitorReport:
    """Result of one monitor run. `metrics` is JSON-able; `alerts` are the breaches."""

    monitor: str
    deployment: str
    time: float
    store: str
    metrics: dict[str, Any]
    alerts: list[Alert]
    webhook: dict[str, Any] | None = None  # the webhook call's outcome; None when nothing was sent
    changes: AlertChanges = field(default_factory=AlertChanges)  # since the previous run
    reference: Reference | None = field(default=None, repr=False)  # for the HTML report's drift series
    spec: MonitorSpec | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return not self.alerts

    def to_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "deployment": self.deployment, "time": self.time, "store": self.store,
                "metrics": self.metrics, "alerts": [a.to_dict() for a in self.alerts],
                "changes": self.changes.to_list(), "webhook": self.webhook}


def window_where(window: Window, now: float, alias: str = "") -> tuple[str, tuple]:
    """SQL condition (`?` placeholders) selecting the window's rows of `requests [alias]`."""
    if window.count is not None:
        return (f"{alias}seq >= COALESCE((SELECT seq FROM requests ORDER BY seq DESC LIMIT 1 OFFSET ?), 0)",
                (window.count - 1,))
    return f"{alias}ts > ? AND {alias}ts <= ?", (now - float(window.seconds or 0), now)


def run_monitor(root: Path, name: str, monitor_spec: dict[str, Any], training_rows: list[dict] | None,
                now: float | None = None, *, store: RequestStore | None = None, embed: Embed | None = None,
                base_model_dir: Path | None = None, webhook_retries: int = 3, webhook_backoff: float = 0.5,
                log: Callable[[str], None] | None = None, reference: Reference | None = None) -> MonitorReport:
    """Run monitor `name` (its `monitors.NAME` mapping) and record its alerts under `root`.

    `training_rows` are the fine-tune's training split (see `drift.Reference.from_rows`);
    None skips drift (and embedding drift); `reference`, when given, is their drift reference
    already built (`llmops.monitor.reference.cached_reference`). `store` defaults to the monitor's configured store (closed afterwards).
    Embedding drift runs with `embed(texts) -> array (n, dim)` when given, else with the model
    `drift.embedding_model` names (`base_model` resolves to `base_model_dir`); either way it
    needs logged prompt texts (`log_text: true`). Without both the report says "not configured".
    """
    log = log or (lambda message: None)
    spec = MonitorSpec.from_dict(name, monitor_spec)
    now = time.time() if now is None else float(now)
    own = store is None
    url = store_url(Path(root), name, spec.store)
    store = store or open_store(url)
    try:
        store.flush()
        metrics = _traffic(store, spec, now)
        metrics["feedback"] = _feedback(store, spec.window, now, metrics["requests"]["count"])
        if reference is None and training_rows:
            reference = Reference.from_rows(training_rows)
        metrics["drift"] = _drift(store, spec.drift_window, now, reference)
        metrics["drift"]["embedding"] = _embedding_drift(
            Path(root), store, spec, now, training_rows, embed, base_model_dir)
        where, params = window_where(spec.window, now)
        metrics["suspicious_clients"] = find_suspicious(store, where, params, spec, metrics["requests"]["first"],
                                                        metrics["requests"]["last"])
    finally:
        if own:
            store.close()
    alerts, changes = record_alerts(Path(root), spec.deployment, name, _alerts(spec, metrics, now), now)
    report = MonitorReport(name, spec.deployment, now, redact_url(url), metrics, alerts, changes=changes,
                           reference=reference, spec=spec)
    report.webhook = _notify(Path(root), spec, alerts, now, webhook_retries, webhook_backoff, log)
    return report


def _notify(root: Path, spec: MonitorSpec, alerts: list[Alert], now: float, retries: int, backoff: float,
            log: Callable[[str], None]) -> dict[str, Any] | None:
    """Tell the webhook what changed since its last successful call; None when nothing is sent."""
    url, problem = webhook_url(spec, os.environ)
    if url is None and problem is None:
        return None
    news = notice_changes(root, spec.deployment, alerts, now)
    if not news:
        return None  # the receiver already knows every open alert: no call
    if url is None:
        log(f"alerts not sent: {problem}")
        return {"url": f"${spec.webhook_env}", "ok": False, "attempts": 0, "status": None, "error": problem,
                "changes": len(news.to_list())}
    payload = {"monitor": spec.name, "deployment": spec.deployment, "time": now,
               "alerts": [a.to_dict() for a in alerts], "changes": news.to_list()}
    result = send_webhook(url, payload, retries=retries, backoff=backoff)
    result["changes"] = len(payload["changes"])
    if result["ok"]:
        mark_sent(root, spec.deployment, alerts)
    else:
        log(f"webhook {result['url']} failed after {result['attempts']} attempts: {result['error']}; the next "
            "`llmops monitor` sends these changes again")
    return result


def _traffic(store: RequestStore, spec: MonitorSpec, now: float) -> dict[str, Any]:
    where, params = window_where(spec.window, now)
    n, errors, client_errors, first, last = store.query(
        f"SELECT COUNT(*), SUM(CASE WHEN {FAILED_SQL} THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN status >= 400 AND status < 500 THEN 1 ELSE 0 END), MIN(ts), MAX(ts) "
        f"FROM requests WHERE {where}", params)[0]
    errors, client_errors = int(errors or 0), int(client_errors or 0)
    n = int(n or 0)
    lat = _Floats(n)
    store.scan(f"SELECT latency_ms FROM requests WHERE {where} AND latency_ms IS NOT NULL", params,
               lambda rows: lat.extend(r[0] for r in rows))
    latency = {"count": lat.size, "p50": None, "p95": None}
    if lat.size:
        p50, p95 = np.percentile(lat.values(), [50, 95], overwrite_input=True)  # partitions in place: no copy
        latency.update(p50=round(float(p50), 3), p95=round(float(p95), 3))
    return {
        "window": spec.window.describe(),
        "requests": {"count": n, "errors": errors, "client_errors": client_errors,
                     "server_errors": errors - client_errors,
                     "first": None if first is None else float(first), "last": None if last is None else float(last)},
        "error_rate": round(errors / n, 6) if n else None,
        "latency_ms": latency,
    }


def _feedback(store: RequestStore, window: Window, now: float, requests: int) -> dict[str, Any]:
    where, params = window_where(window, now, alias="r.")
    count, positive, rated, raters = store.query(
        "SELECT COUNT(*), SUM(f.positive), COUNT(DISTINCT f.request_id), COUNT(DISTINCT f.client) "
        f"FROM {LATEST_FEEDBACK_SQL} f JOIN requests r ON r.id = f.request_id WHERE {where}", params)[0]
    sent = store.query(f"SELECT COUNT(*) FROM feedback f JOIN requests r ON r.id = f.request_id WHERE {where}",
                       params)[0][0]
    count, positive, rated = int(count or 0), int(positive or 0), int(rated or 0)
    # `count`: ratings that count (the latest per response and client); `superseded`: the
    # others (a client re-rating, or repeating itself), reported so spam can be seen.
    return {"count": count, "positive": positive, "superseded": int(sent or 0) - count,
            "clients": int(raters or 0),
            "positive_rate": round(positive / count, 6) if count else None,
            "rated_share": round(rated / requests, 6) if requests else None}


def _drift(store: RequestStore, window: Window, now: float, reference: Reference | None) -> dict[str, Any]:
    out: dict[str, Any] = {"window": window.describe()}
    where, params = window_where(window, now)
    if reference is None:
        out["status"] = "no training data"
        return out
    lengths: dict[float, int] = {}
    tokens = np.zeros(TOKEN_BUCKETS, dtype=np.int64)

    def add(rows: list[tuple]) -> None:
        nonlocal tokens
        values, counts = np.unique(np.fromiter((r[0] for r in rows), dtype=np.float64, count=len(rows)),
                                   return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            lengths[v] = lengths.get(v, 0) + c
        joined = b"".join(r[1] for r in rows if r[1])
        tokens += np.bincount(np.frombuffer(joined, dtype=np.uint8), minlength=TOKEN_BUCKETS)

    n = store.scan(f"SELECT prompt_words, token_bag FROM requests WHERE {where} AND prompt_words > 0", params, add)
    out["requests"] = n
    out["reference_rows"] = reference.rows
    if n < MIN_DRIFT_REQUESTS or reference.rows < MIN_DRIFT_REQUESTS:
        out["status"] = f"too few requests or training rows to judge (need {MIN_DRIFT_REQUESTS} of each)"
        return out
    values = np.asarray(sorted(lengths), dtype=np.float64)
    out["prompt_length"] = reference.length_drift_counts(values, np.asarray([lengths[v] for v in values.tolist()],
                                                                             dtype=np.int64))
    out["token_frequency"] = reference.token_drift(tokens)
    out["status"] = "ok"
    return out


class _Floats:
    """A growing float64 column: `capacity` preallocated (the rows the window counted), doubled
    if more arrive (a live server may log into the window meanwhile)."""

    def __init__(self, capacity: int) -> None:
        self._data = np.empty(max(16, capacity), dtype=np.float64)
        self.size = 0

    def extend(self, values: Any) -> None:
        chunk = np.fromiter(values, dtype=np.float64)
        end = self.size + chunk.size
        if end > self._data.size:
            grown = np.empty(max(end, 2 * self._data.size), dtype=np.float64)
            grown[:self.size] = self._data[:self.size]
            self._data = grown
        self._data[self.size:end] = chunk
        self.size = end

    def values(self) -> np.ndarray:
        return self._data[:self.size]


def _embedding_drift(root: Path, store: RequestStore, spec: MonitorSpec, now: float,
                     training_rows: list[dict] | None, embed: Embed | None,
                     base_model_dir: Path | None) -> dict[str, Any]:
    """Cosine distance between the mean embeddings of logged prompts and training prompts."""
    if embed is None and spec.embedding_model is None:
        return {"status": "not configured", "detail": "set `drift.embedding_model` on the monitor to an "
                "embedding model folder (or `base_model`) to measure embedding drift"}
    needs_text = {"status": "needs log_text", "detail": "embedding drift needs log_text: true"}
    if spec.embedding_model is not None and not spec.log_text:
        return needs_text
    if not training_rows:
        return {"status": "no training data"}
    where, params = window_where(spec.drift_window, now)
    texts = [r[0] for r in store.query(f"SELECT prompt FROM requests WHERE {where} AND prompt IS NOT NULL "
                                       f"ORDER BY seq DESC LIMIT {MAX_EMBED_TEXTS}", params)]
    if not texts:
        return needs_text if not spec.log_text else {
            "status": "no logged texts", "detail": "no request in the drift window has its prompt text logged"}
    train_texts = training_sample(training_rows)
    if len(texts) < MIN_DRIFT_REQUESTS or len(train_texts) < MIN_DRIFT_REQUESTS:
        return {"status": f"too few logged texts or training rows to judge (need {MIN_DRIFT_REQUESTS} of each)",
                "requests": len(texts)}
    if embed is None:
        embed = load_embedder(root, str(spec.embedding_model), base_model_dir,
                              f"monitors.{spec.name}.drift.embedding_model")
    return embedding_drift(embed, train_texts, texts, cache_dir=root / EMBEDDING_CACHE_DIR, name=spec.name)


def _alert(spec: MonitorSpec, now: float, check: str, metric: str, value: float, threshold: float, op: str,
           message: str, subject: str | None = None) -> Alert:
    return Alert(spec.deployment, spec.name, check, metric, value, threshold, op, message, now, subject)


def _short(value: float) -> str:
    """0.31 -> "0.31", 0.0042 -> "0.0042": two decimals, or two significant digits when small."""
    return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.2g}"


def _alerts(spec: MonitorSpec, m: dict[str, Any], now: float) -> list[Alert]:
    out: list[Alert] = []
    drift = m["drift"]
    for feature, label in (("prompt_length", "prompt length"), ("token_frequency", "token frequency")):
        stats = drift.get(feature)
        if not stats:
            continue
        for stat, limit in (("psi", spec.psi_max), ("ks", spec.ks_max)):
            if limit is not None and stats[stat] > limit:
                out.append(_alert(spec, now, "drift", f"drift.{feature}.{stat}", stats[stat], limit, ">",
                                  f"drift: {stat.upper()} {stats[stat]:.2f} > {limit:g} on {label}"))
    emb = drift.get("embedding") or {}
    if spec.embedding_max is not None and emb.get("status") == "ok" and emb["cosine_distance"] > spec.embedding_max:
        dist, floor = emb["cosine_distance"], emb.get("noise_floor")
        note = "" if floor is None else f" (training noise floor {_short(floor)})"
        out.append(_alert(spec, now, "drift", "drift.embedding.cosine_distance", dist, spec.embedding_max, ">",
                          f"drift: embedding distance {_short(dist)} > {spec.embedding_max:g}{note}"))
    fb = m["feedback"]
    if (spec.min_positive_rate is not None and fb["positive_rate"] is not None
            and fb["count"] >= spec.min_feedback_count and fb["positive_rate"] < spec.min_positive_rate):
        out.append(_alert(spec, now, "feedback", "feedback.positive_rate", fb["positive_rate"], spec.min_positive_rate,
                          "<", f"feedback: positive rate {fb['positive_rate']:.2f} < {spec.min_positive_rate:g} "
                          f"({fb['count']} ratings)"))
    p95 = m["latency_ms"]["p95"]
    if spec.p95_ms_max is not None and p95 is not None and p95 > spec.p95_ms_max:
        out.append(_alert(spec, now, "latency", "latency_ms.p95", p95, spec.p95_ms_max, ">",
                          f"latency: p95 {p95:.0f} ms > {spec.p95_ms_max:g} ms"))
    rate = m["error_rate"]
    if spec.error_rate_max is not None and rate is not None and rate > spec.error_rate_max:
        req = m["requests"]
        out.append(_alert(spec, now, "error_rate", "error_rate", rate, spec.error_rate_max, ">",
                          f"errors: error rate {rate:.2%} > {spec.error_rate_max:.2%} ({req['client_errors']} "
                          f"refused 4xx, {req['server_errors']} failed 5xx or cut off)"))
    if spec.suspicious:
        clients = m["suspicious_clients"]
        for c in clients[:MAX_SUSPICIOUS_ALERTS]:
            out.append(_alert(spec, now, "suspicious", "suspicious_clients", float(len(c["reasons"])), 0.0, ">",
                              f"suspicious client {c['client']}: {'; '.join(c['reasons'])}", str(c["client"])))
        if len(clients) > MAX_SUSPICIOUS_ALERTS:
            rest = len(clients) - MAX_SUSPICIOUS_ALERTS
            out.append(_alert(spec, now, "suspicious", "suspicious_clients", float(rest), 0.0, ">",
                              f"suspicious clients: {rest} more not listed", "more"))
    return out
