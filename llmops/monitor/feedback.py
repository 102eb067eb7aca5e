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

from llmops.fsutil import atomic_write_text
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


def export_feedback(store: "RequestStore", path: Path | str, min_rating: Any = None,
                    pairs: Path | str | None = None) -> int:
    """Write rated requests as JSONL training rows; return how many rows were written.

    One row per (request, client): a client's latest rating of a response counts. A row holds
    the prompt's variables as the user sent them (`question`, ...: what the server recovered
    from the request, see `llmops.serve.service`), `answer` (the correction when one was
    given, else the model's answer), `rating`, `positive`, `corrected`, `completion` (what
    the model said), `client`, `request_id`, `time`, and `prompt` (the text the model saw).
    An answer rated down without a correction is no target: it is left out of the rows, and
    with `pairs` becomes the `rejected` side of a preference pair (`prompt`, `chosen`,
    `rejected`, and the variables) when a better answer for the same input exists: a
    correction, or an answer rated up. Requests logged without texts (`log_text: false`)
    cannot be exported; if rated requests exist but none has text, `MonitorError` says so.
    Files are written atomically (temp file + rename).
    """
    store.flush()
    floor = _min_rating(min_rating)
    rows = store.query(
        "SELECT f.request_id, f.rating_kind, f.rating, f.positive, f.comment, f.correction, f.client, r.prompt, "
        "r.completion, r.inputs, r.ts FROM feedback f JOIN (SELECT request_id, COALESCE(client, '') AS who, "
        "MAX(seq) AS seq FROM feedback GROUP BY request_id, COALESCE(client, '')) last ON last.seq = f.seq "
        "JOIN requests r ON r.id = f.request_id ORDER BY f.seq")
    out: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    better: dict[str, list[str]] = {}  # input key -> good answers, in order
    seen: set[tuple[str, str]] = set()
    without_text = 0
    for rid, kind, value, positive, comment, correction, client, prompt, completion, inputs, ts in rows:
        if (rid, client or "") in seen:
            continue
        seen.add((rid, client or ""))
        if not prompt or (completion is None and correction is None):
            without_text += 1
            continue
        variables = _variables(inputs)
        key = json.dumps(variables, sort_keys=True) if variables else prompt
        base = {**variables, "prompt": prompt, "completion": completion, "rating": comparable_rating(kind, value),
                "positive": bool(positive), "corrected": correction is not None, "comment": comment,
                "client": client, "request_id": rid, "time": ts}
        if correction is not None:
            better.setdefault(key, []).append(correction)
        elif positive and completion is not None:
            better.setdefault(key, []).append(completion)
        if not positive:
            rejected.append({"key": key, "variables": variables, "prompt": prompt, "rejected": completion,
                             "request_id": rid})
            if correction is None:
                continue  # a bad answer is no target
        if comparable_rating(kind, value) < floor and correction is None:
            continue
        out.append({**base, "answer": correction if correction is not None else completion})
    if without_text and not out and not rejected:
        raise MonitorError(f"{without_text} rated request(s) have no stored text to export; set "
                           "`log_text: true` on the monitor so prompts and completions are logged.")
    atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in out))
    if pairs is not None:
        made = []
        for r in rejected:
            chosen = next((a for a in better.get(r["key"], []) if a != r["rejected"]), None)
            if chosen is not None and r["rejected"] is not None:
                made.append({**r["variables"], "prompt": r["prompt"], "chosen": chosen, "rejected": r["rejected"],
                             "request_id": r["request_id"]})
        atomic_write_text(Path(pairs), "".join(json.dumps(m, ensure_ascii=False, sort_keys=True) + "\n" for m in made))
    return len(out)


def _variables(inputs: Any) -> dict[str, Any]:
    if not inputs:
        return {}
    try:
        value = json.loads(inputs)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
