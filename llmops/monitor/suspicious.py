"""Suspicious clients: request-rate spikes against their usual rate, repeated prompt-injection
attempts, very long prompts. Aggregated in SQL over the window (and the store's history).

A rate spike: a client's busiest minute in the window exceeds `rate_spike_factor` times its
baseline, the larger of `baseline_per_min` (default 1 request a minute, so a quiet client's
burst of a few requests is not a spike) and its usual rate. The usual rate comes from the
store's history, the window included: the client's requests over the `HISTORY_DAYS` before
the window's last request, except those of its busiest minute, divided by the other minutes
since its first request there. So the check works from the first window (no history before
it is needed): a client that has only ever sent one burst has a usual rate of 0 and is judged
against `baseline_per_min`, and a client steadily busy through the window is not a spike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmops.monitor.spec import MonitorSpec
    from llmops.monitor.store import RequestStore

BUCKET_SECONDS = 60
HISTORY_DAYS = 7


def find_suspicious(store: "RequestStore", where: str, params: tuple, spec: "MonitorSpec",
                    window_start: float | None, window_end: float | None = None) -> list[dict[str, Any]]:
    """Suspicious clients in the window (`where` selects its rows, from `window_start` to
    `window_end`: its first and last request times), each with its reasons."""
    per_client = store.query(
        "SELECT client, COUNT(*), SUM(CASE WHEN injection > 0 THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN prompt_chars > ? THEN 1 ELSE 0 END), MAX(prompt_chars) "
        f"FROM requests WHERE {where} GROUP BY client", (spec.max_prompt_chars, *params))
    # the busiest minute per client, in SQL: one row per client comes back, not one per minute
    peaks: dict[str, int] = {client: int(n) for client, n in store.query(
        f"SELECT client, MAX(n) FROM (SELECT client, COUNT(*) AS n FROM requests WHERE {where} "
        f"GROUP BY client, CAST(ts / {BUCKET_SECONDS} AS INTEGER)) per_minute GROUP BY client", params)}
    history: dict[str, tuple[int, float]] = {}
    if window_start is not None and window_end is not None:
        since = min(window_start, window_end - HISTORY_DAYS * 86400)
        rows = store.query("SELECT client, COUNT(*), MIN(ts) FROM requests WHERE ts <= ? AND ts >= ? GROUP BY client",
                           (window_end, since))
        history = {client: (int(n), float(first)) for client, n, first in rows}
    found = []
    for client, n, injections, long_prompts, longest in per_client:
        injections, long_prompts = int(injections or 0), int(long_prompts or 0)
        peak = int(peaks.get(client) or 0)
        usual = usual_rate(history.get(client), peak, window_end)
        baseline = max(usual or 0.0, spec.baseline_per_min)
        reasons = []
        if injections > spec.injection_max:
            reasons.append(f"{injections} prompt-injection attempts (max {spec.injection_max})")
        if long_prompts:
            reasons.append(f"{long_prompts} prompts over {spec.max_prompt_chars} characters (longest {longest})")
        if window_end is not None and peak > spec.rate_spike_factor * baseline:
            reasons.append(f"rate spike: {peak} requests in one minute, usually {usual or 0.0:.2f}/min "
                           f"(> {spec.rate_spike_factor:g}x {baseline:g}/min)")
        if reasons:
            found.append({"client": client, "requests": int(n), "reasons": reasons, "injection_attempts": injections,
                          "long_prompts": long_prompts, "peak_per_minute": peak,
                          "usual_per_minute": None if usual is None else round(usual, 4),
                          "baseline_per_minute": round(baseline, 4)})
    return sorted(found, key=lambda c: (-len(c["reasons"]), str(c["client"])))


def usual_rate(history: tuple[int, float] | None, peak: int, window_end: float | None) -> float | None:
    """Requests per minute outside the busiest minute, over the other minutes from the
    client's first request (`history`: its count and first time) to `window_end`; 0 when
    all its requests fell in one minute, None without history."""
    if history is None or window_end is None:
        return None
    count, first = history
    minutes = int(window_end // BUCKET_SECONDS) - int(first // BUCKET_SECONDS) + 1
    if minutes <= 1:
        return 0.0
    return max(count - peak, 0) / (minutes - 1)
