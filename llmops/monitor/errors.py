"""Errors raised by the monitoring library (all `LlmopsError`s with an actionable message).

`FeedbackError`s carry the HTTP status the feedback route should answer with:
`BadFeedbackError` -> 400 (malformed body or rating), `UnknownRequestError` -> 404.
"""

from __future__ import annotations

from llmops.errors import LlmopsError


class MonitorError(LlmopsError):
    """A monitor cannot run: bad spec, unusable store, missing data."""


class StoreError(MonitorError):
    """The request store cannot be opened or written."""


class FeedbackError(MonitorError):
    """Feedback refused; `status` is the HTTP status to answer with."""

    status = 400


class BadFeedbackError(FeedbackError):
    """The feedback body or its rating is malformed (HTTP 400)."""

    status = 400


class UnknownRequestError(FeedbackError):
    """Feedback names a request id the store has never logged (HTTP 404)."""

    status = 404
