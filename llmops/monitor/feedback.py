"""Human feedback: validating `POST /v1/feedback` bodies, and exporting rated requests as a dataset.

A rating is thumbs (`"up"` / `"down"`, also `"thumbs_up"` / `"thumbs_down"`) or stars (an
integer 1..5). It is stored as `(rating_kind, rating, positive)`: thumbs as 1 (up) / 0
(down), stars as given; positive means thumbs up or 4..5 stars. For `min_rating`
comparisons thumbs up counts as 5 and thumbs down as 1.

Each rating records the client that sent it (`client_id`, as the server attributes requests:
`X-Client-Id`, else a hash of the bearer token, else the address; None when the caller does
not say). One rating per (response, client) counts, the latest winning: `LATEST_FEEDBACK_SQL`
selects those rows, so 40 identical ratings from one client move no rate. Ratings without a
client id count as one client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops.monitor.alerts import write_atomic
from llmops.monitor.errors import BadFeedbackError, MonitorError

if TYPE_CHECKING:
    from llmops.monitor.store import RequestStore

MAX_COMMENT_CHARS = 10_000
MAX_CORRECTION_CHARS = 100_000
FEEDBACK_KEYS = {"request_id", "rating", "comment", "correction"}
_THUMBS = {"up": 1, "thumbs_up": 1, "down": 0, "thumbs_down": 0}
MAX_CLIENT_ID_CHARS = 200
# The feedback rows that count: the latest of each (request, client). `?`-free, for any store.
LATEST_FEEDBACK_SQL = ("(SELECT * FROM feedback WHERE seq IN (SELECT MAX(seq) FROM feedback "
                       "GROUP BY request_id, COALESCE(client, '')))")


@dataclass(frozen=True)
class Feedback:
    """One rating of one request; `rating` is 0/1 for thumbs, 1..5 for stars."""

    request_id: str
    rating: int
    rating_kind: str  # "thumbs" | "stars"
    positive: bool
    comment: str | None = None
    correction: str | None = None
    client_id: str | None = None  # who rated; None when the caller did not say

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "rating": self.rating, "rating_kind": self.rating_kind,
                "positive": self.positive, "comment": self.comment, "correction": self.correction,
                "client_id": self.client_id}


def normalise_rating(rating: Any) -> tuple[str, int, bool]:
    """`(kind, value, positive)` for a thumbs or 1..5 rating; `BadFeedbackError` otherwise."""
    if isinstance(rating, str) and rating.strip().lower() in _THUMBS:
        value = _THUMBS[rating.strip().lower()]
        return "thumbs", value, value == 1
    if isinstance(rating, int) and not isinstance(rating, bool) and 1 <= rating <= 5:
        return "stars", rating, rating >= 4
    raise BadFeedbackError(f"rating {rating!r} is not valid: send \"up\" or \"down\", or an integer from 1 to 5.")


def _optional_text(body: dict[str, Any], key: str, limit: int) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadFeedbackError(f"'{key}' must be a string.")
    if len(value) > limit:
        raise BadFeedbackError(f"'{key}' is longer than {limit} characters; shorten it.")
    return value


def parse_feedback(body: Any, client_id: str | None = None) -> Feedback:
    """Validate a feedback body `{request_id, rating, comment?, correction?}` (`id` is accepted
    for `request_id`); raises `BadFeedbackError` (HTTP 400) naming what is wrong.

    `client_id` is who sent it, as the server attributed the feedback request (never taken
    from the body, which anyone can fill in)."""
    if not isinstance(body, dict):
        raise BadFeedbackError("the feedback body must be a JSON object with request_id and rating.")
    body = dict(body)
    if "request_id" not in body and "id" in body:
        body["request_id"] = body.pop("id")
    unknown = sorted(set(body) - FEEDBACK_KEYS)
    if unknown:
        raise BadFeedbackError(f"unknown field(s) {', '.join(unknown)}; allowed: request_id, rating, comment, "
                               "correction.")
    rid = body.get("request_id")
    if not isinstance(rid, str) or not rid.strip() or len(rid) > 200:
        raise BadFeedbackError("'request_id' is required: the `id` of the response being rated.")
    if "rating" not in body:
        raise BadFeedbackError("'rating' is required: \"up\", \"down\" or an integer from 1 to 5.")
    kind, value, positive = normalise_rating(body["rating"])
    client = str(client_id).strip()[:MAX_CLIENT_ID_CHARS] if client_id is not None else None
    return Feedback(rid.strip(), value, kind, positive, _optional_text(body, "comment", MAX_COMMENT_CHARS),
                    _optional_text(body, "correction", MAX_CORRECTION_CHARS), client or None)


def comparable_rating(kind: str, value: int) -> int:
    """A rating on the 1..5 scale (thumbs up = 5, down = 1)."""
    if kind == "thumbs":
        return 5 if value else 1
    return int(value)


def _min_rating(min_rating: Any) -> int:
    if min_rating is None:
        return 1
    if isinstance(min_rating, str):
        kind, value, _ = normalise_rating(min_rating)
        return comparable_rating(kind, value)
    if isinstance(min_rating, int) and not isinstance(min_rating, bool) and 1 <= min_rating <= 5:
        return min_rating
    raise MonitorError(f"min_rating {min_rating!r} is not \"up\", \"down\" or an integer 1..5.")


def export_feedback(store: "RequestStore", path: Path | str, min_rating: Any = None) -> int:
    """Write rated requests as JSONL (`question`, `answer`, `rating`, `request_id`, ...) and
    return how many rows were written.

    The latest feedback per request counts; `answer` is the correction when one was given,
    else the model's completion. Only requests logged with their texts (`log_text: true`)
    can be exported; if rated requests exist but none has text, `MonitorError` says so.
    The file is written atomically (temp file + rename).
    """
    store.flush()
    floor = _min_rating(min_rating)
    rows = store.query(
        "SELECT f.request_id, f.rating_kind, f.rating, f.positive, f.comment, f.correction, r.prompt, "
        "r.completion, r.ts FROM feedback f JOIN (SELECT request_id, MAX(seq) AS seq FROM feedback "
        "GROUP BY request_id) last ON last.seq = f.seq JOIN requests r ON r.id = f.request_id ORDER BY f.seq")
    out: list[str] = []
    seen: set[str] = set()
    without_text = 0
    for rid, kind, value, positive, comment, correction, prompt, completion, ts in rows:
        if rid in seen or comparable_rating(kind, value) < floor:
            continue
        seen.add(rid)
        if not prompt or (completion is None and correction is None):
            without_text += 1
            continue
        row = {"question": prompt, "answer": correction if correction is not None else completion,
               "rating": comparable_rating(kind, value), "positive": bool(positive),
               "corrected": correction is not None, "comment": comment, "request_id": rid,
               "completion": completion, "time": ts}
        out.append(json.dumps(row, ensure_ascii=False, sort_keys=True))
    if without_text and not out:
        raise MonitorError(f"{without_text} rated request(s) have no stored text to export; set "
                           "`log_text: true` on the monitor so prompts and completions are logged.")
    write_atomic(Path(path), "".join(line + "\n" for line in out))
    return len(out)

