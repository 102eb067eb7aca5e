"""Suspicious clients: request-rate spikes against their own history, repeated prompt-injection
attempts, very long prompts. Aggregated in SQL over the window (and a history before it).

A rate spike: a client's busiest minute in the window exceeds `rate_spike_factor` times its
usual requests per minute (its count over the `HISTORY_DAYS` before the window divided by
the minutes since its first request there, floored at 1 per minute so a quiet client's
occasional burst of a few requests is not a spike). Clients with fewer than `MIN_HISTORY`
earlier requests have no usual rate and are not judged on spikes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmops.monitor.spec import MonitorSpec
    from llmops.monitor.store import RequestStore

BUCKET_SECONDS = 60
HISTORY_DAYS = 7
MIN_HISTORY = 10


def find_suspicious(store: "RequestStore", where: str, params: tuple, spec: "MonitorSpec",
                    window_start: float | None) -> list[dict[str, Any]]:
    """Suspicious clients in the window (`where` selects its rows), each with its reasons."""
    per_client = store.query(
        "SELECT client, COUNT(*), SUM(CASE WHEN injection > 0 THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN prompt_chars > ? THEN 1 ELSE 0 END), MAX(prompt_chars) "
        f"FROM requests WHERE {where} GROUP BY client", (spec.max_prompt_chars, *params))
    peaks = dict(store.query(
        f"SELECT client, MAX(n) FROM (SELECT client, CAST(ts / {BUCKET_SECONDS} AS INTEGER) AS b, COUNT(*) AS n "
        f"FROM requests WHERE {where} GROUP BY client, CAST(ts / {BUCKET_SECONDS} AS INTEGER)) per_bucket "
        "GROUP BY client", params))
    history: dict[str, tuple[int, float]] = {}
    if window_start is not None:
        rows = store.query("SELECT client, COUNT(*), MIN(ts) FROM requests WHERE ts < ? AND ts >= ? GROUP BY client",
                           (window_start, window_start - HISTORY_DAYS * 86400))
        history = {client: (int(n), float(first)) for client, n, first in rows}
    found = []
    for client, n, injections, long_prompts, longest in per_client:
        injections, long_prompts = int(injections or 0), int(long_prompts or 0)
        peak = int(peaks.get(client) or 0)
        usual = _usual_rate(history.get(client), window_start)
        reasons = []
        if injections > spec.injection_max:
            reasons.append(f"{injections} prompt-injection attempts (max {spec.injection_max})")
        if long_prompts:
            reasons.append(f"{long_prompts} prompts over {spec.max_prompt_chars} characters (longest {longest})")
        if usual is not None and peak > spec.rate_spike_factor * max(usual, 1.0):
            reasons.append(f"rate spike: {peak} requests in one minute, usually {usual:.2f}/min "
                           f"(> {spec.rate_spike_factor:g}x)")
        if reasons:
            found.append({"client": client, "requests": int(n), "reasons": reasons, "injection_attempts": injections,
                          "long_prompts": long_prompts, "peak_per_minute": peak,
                          "usual_per_minute": None if usual is None else round(usual, 4)})
    return sorted(found, key=lambda c: (-len(c["reasons"]), str(c["client"])))


def _usual_rate(history: tuple[int, float] | None, window_start: float | None) -> float | None:
    if history is None or window_start is None or history[0] < MIN_HISTORY:
        return None
    minutes = max((window_start - history[1]) / BUCKET_SECONDS, 1.0)
    return history[0] / minutes
