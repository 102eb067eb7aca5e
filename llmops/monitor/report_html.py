"""`write_html_report`: one static HTML page with a monitor run's numbers, alerts and time series.

Plots (SVG, `llmops.charts`): requests and errors, latency
p50/p95, feedback positive rate, and drift (PSI of prompt length and token frequency per
time bucket against the training reference). The series cover the report's window, split
into up to `BUCKETS` equal time buckets. Rows are streamed from the store in batches
(`RequestStore.scan`) and summed per bucket; only latencies and their buckets are kept whole
(per-bucket percentiles need them: 16 bytes a request).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from llmops.charts import series_svg
from llmops.fsutil import atomic_write_text
from llmops.monitor.drift import psi
from llmops.monitor.feedback import LATEST_FEEDBACK_SQL
from llmops.monitor.records import TOKEN_BUCKETS
from llmops.monitor.runner import FAILED_SQL, MIN_DRIFT_REQUESTS, MonitorReport, window_where
from llmops.monitor.store import RequestStore

BUCKETS = 48


def _buckets(report: MonitorReport) -> tuple[float, float, int] | None:
    req = report.metrics["requests"]
    if not req["count"] or req["first"] is None:
        return None
    start, end = req["first"], max(req["last"], req["first"] + 1.0)
    return start, (end - start) / BUCKETS * (1 + 1e-9), BUCKETS


def series(report: MonitorReport, store: RequestStore) -> dict[str, Any]:
    """Per-bucket series (bucket start times and values) for the report's window."""
    spec = report.spec
    grid = _buckets(report)
    if spec is None or grid is None:
        return {}
    start, width, n = grid
    where, params = window_where(spec.window, report.time)
    t = start + width * np.arange(n)
    out: dict[str, Any] = {"t": t, "requests": np.zeros(n), "errors": np.zeros(n), "p50": np.full(n, np.nan),
                           "p95": np.full(n, np.nan), "positive_rate": np.full(n, np.nan),
                           "psi_length": np.full(n, np.nan), "psi_tokens": np.full(n, np.nan)}
    requests = np.zeros(n, dtype=np.int64)
    errors = np.zeros(n, dtype=np.int64)
    lat_parts: list[tuple[np.ndarray, np.ndarray]] = []  # (bucket, latency) of the timed requests

    def add_requests(rows: list[tuple]) -> None:
        arr = np.asarray([(r[0], np.nan if r[1] is None else r[1], r[2]) for r in rows], dtype=np.float64)
        b = _bucket(arr[:, 0], start, width, n)
        requests[:] += np.bincount(b, minlength=n)
        errors[:] += np.bincount(b, weights=arr[:, 2], minlength=n).astype(np.int64)
        timed = ~np.isnan(arr[:, 1])
        lat_parts.append((b[timed].astype(np.int16), arr[timed, 1]))

    store.scan(f"SELECT ts, latency_ms, CASE WHEN {FAILED_SQL} THEN 1 ELSE 0 END FROM requests WHERE {where}",
               params, add_requests)
    out["requests"], out["errors"] = requests.astype(float), errors.astype(float)
    if lat_parts:
        buckets = np.concatenate([p[0] for p in lat_parts])
        lat = np.concatenate([p[1] for p in lat_parts])
        lat_parts.clear()
        order = np.argsort(buckets, kind="stable")
        buckets, lat = buckets[order], lat[order]
        del order
        bounds = np.searchsorted(buckets, np.arange(n + 1), side="left")
        for i in range(n):
            if bounds[i + 1] > bounds[i]:
                out["p50"][i], out["p95"][i] = np.percentile(lat[bounds[i]:bounds[i + 1]], [50, 95])
    fwhere, fparams = window_where(spec.window, report.time, alias="r.")
    rated = np.zeros(n, dtype=np.int64)
    positive = np.zeros(n, dtype=np.int64)

    def add_feedback(rows: list[tuple]) -> None:
        arr = np.asarray(rows, dtype=np.float64)
        b = _bucket(arr[:, 0], start, width, n)
        rated[:] += np.bincount(b, minlength=n)
        positive[:] += np.bincount(b, weights=arr[:, 1], minlength=n).astype(np.int64)

    if store.scan(f"SELECT r.ts, f.positive FROM {LATEST_FEEDBACK_SQL} f JOIN requests r ON r.id = f.request_id "
                  f"WHERE {fwhere}", fparams, add_feedback):
        out["positive_rate"] = np.where(rated > 0, positive / np.maximum(rated, 1), np.nan)
    if report.reference is not None:
        _drift_series(report, store, where, params, start, width, n, out)
    return out


def _bucket(ts: np.ndarray, start: float, width: float, n: int) -> np.ndarray:
    return np.clip(((ts - start) / width).astype(int), 0, n - 1)


def _drift_series(report: MonitorReport, store: RequestStore, where: str, params: tuple, start: float,
                  width: float, n: int, out: dict[str, Any]) -> None:
    """PSI per bucket: length histograms and token bucket counts summed per time bucket."""
    ref = report.reference
    if ref is None:
        return
    bins = ref.edges.size + 1
    length_hist = np.zeros((n, bins), dtype=np.int64)
    tokens = np.zeros((n, TOKEN_BUCKETS), dtype=np.int64)

    def add(rows: list[tuple]) -> None:
        ts = np.fromiter((r[0] for r in rows), dtype=np.float64, count=len(rows))
        lengths = np.fromiter((r[1] for r in rows), dtype=np.float64, count=len(rows))
        b = _bucket(ts, start, width, n)
        cell = b * bins + np.searchsorted(ref.edges, lengths, side="left")
        length_hist[:] += np.bincount(cell, minlength=n * bins).reshape(n, bins)
        bags = [r[2] or b"" for r in rows]
        sizes = np.fromiter((len(x) for x in bags), dtype=np.int64, count=len(bags))
        ids = np.frombuffer(b"".join(bags), dtype=np.uint8).astype(np.int64)
        tokens[:] += np.bincount(np.repeat(b, sizes) * TOKEN_BUCKETS + ids,
                                 minlength=n * TOKEN_BUCKETS).reshape(n, TOKEN_BUCKETS)

    if not store.scan(f"SELECT ts, prompt_words, token_bag FROM requests WHERE {where} AND prompt_words > 0",
                      params, add):
        return
    for i in range(n):
        if length_hist[i].sum() < MIN_DRIFT_REQUESTS:
            continue
        out["psi_length"][i] = psi(ref.expected_lengths, length_hist[i])
        out["psi_tokens"][i] = psi(ref.token_counts, tokens[i])


def _plot(path: Path, t: np.ndarray, lines: list[tuple[str, np.ndarray]], title: str, ylabel: str,
          hline: float | None = None) -> None:
    svg = series_svg(title, ylabel, t.tolist(), [(label, values.tolist()) for label, values in lines], hline)
    atomic_write_text(path, svg)


def write_html_report(report: MonitorReport, store: RequestStore, out_dir: Path | str) -> Path:
    """Write `index.html` and its SVG plots into `out_dir`; returns the page's path.

    `store` must be open (the store `report` was computed from).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = series(report, store)
    images = []
    if s:
        spec = report.spec
        plots = [
            ("requests.svg", [("requests", s["requests"]), ("errors", s["errors"])], "Requests per bucket", "count",
             None),
            ("latency.svg", [("p50", s["p50"]), ("p95", s["p95"])], "Latency", "ms",
             spec.p95_ms_max if spec else None),
            ("feedback.svg", [("positive rate", s["positive_rate"])], "Feedback positive rate", "share",
             spec.min_positive_rate if spec else None),
            ("drift.svg", [("PSI prompt length", s["psi_length"]), ("PSI token frequency", s["psi_tokens"])],
             "Drift against the training split", "PSI", spec.psi_max if spec else None),
        ]
        for name, lines, title, ylabel, hline in plots:
            _plot(out / name, s["t"], lines, title, ylabel, hline)
            images.append(name)
    page = out / "index.html"
    page.write_text(_page(report, images), encoding="utf-8")
    return page


def _page(report: MonitorReport, images: list[str]) -> str:
    e = html.escape
    alerts = "".join(f"<li>{e(a.message)}</li>" for a in report.alerts) or "<li>none</li>"
    imgs = "".join(f'<figure><img src="{e(n)}" alt="{e(n[:-4])}"></figure>' for n in images)
    if not images:
        imgs = "<p>No requests in the window: nothing to plot.</p>"
    metrics = e(json.dumps(report.metrics, indent=2, sort_keys=True, default=str))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Monitor {e(report.monitor)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}pre{background:#f4f4f4;padding:1em}</style></head><body>"
            f"<h1>Monitor {e(report.monitor)} (deployment {e(report.deployment)})</h1>"
            f"<p>Window: {e(str(report.metrics.get('window')))}; store: {e(report.store)}</p>"
            f"<h2>Alerts</h2><ul>{alerts}</ul><h2>Time series</h2>{imgs}"
            f"<h2>Metrics</h2><pre>{metrics}</pre></body></html>\n")
