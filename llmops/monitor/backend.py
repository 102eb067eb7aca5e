"""`RequestStore`: the interface of the append-only request store, and the batch writer every
backend shares (`store.SqliteStore`, `postgres.PostgresStore`).

It lives below both backends so that `store` (which picks a backend in `open_store`) and
`postgres` (which subclasses it) do not import each other. See `llmops.monitor.store` for
how writes, reads and migrations work.
"""

from __future__ import annotations

import atexit
import queue
from abc import ABC, abstractmethod
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from llmops.monitor.errors import StoreError, UnknownRequestError
from llmops.monitor.feedback import Feedback, normalise_rating
from llmops.monitor.records import ROW_FIELDS, record_to_row

SCHEMA_VERSION = 1
SKIP_PATHS = ("/health", "/v1/models", "/v1/feedback")  # not model traffic: not logged by default
FEEDBACK_FIELDS = ("request_id", "ts", "rating_kind", "rating", "positive", "comment", "correction", "client")
SCAN_BATCH = 16_384  # rows per batch that `scan` hands over
_STOP = object()


class _Flush:
    """A queue marker: the writer sets `done` once everything queued before it is stored."""

    def __init__(self) -> None:
        self.done = threading.Event()




class RequestStore(ABC):
    """Append-only log of requests and feedback with a background batch writer.

    Backends (SQLite here, PostgreSQL in `llmops.monitor.postgres`) implement `describe`,
    `_write`, `_query` and `_close_connections`. Rows are never updated or deleted.
    """

    placeholder = "?"

    def __init__(self, log_text: bool = False, batch_size: int = 500, flush_interval: float = 0.2,
                 on_error: Callable[[str], None] | None = None, skip_paths: Sequence[str] = SKIP_PATHS) -> None:
        self.log_text = log_text
        self.skip_paths = frozenset(skip_paths)
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.on_error = on_error or (lambda message: None)
        self.write_errors = 0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False

    # --- writing -------------------------------------------------------------------------
    def __call__(self, record: Mapping[str, Any]) -> None:
        self.log(record)

    def log(self, record: Mapping[str, Any]) -> None:
        """Enqueue one server record; returns at once (the writer thread stores it).

        Records of `skip_paths` (health checks, model listing, feedback) are ignored."""
        if record.get("path") in self.skip_paths:
            return
        self._check_open()
        self._ensure_writer()
        self._queue.put(dict(record))

    def append_rows(self, rows: Iterable[Sequence[Any]]) -> int:
        """Insert already-converted rows (`ROW_FIELDS` order, see `records.record_to_row`) now,
        in one transaction: after a crash either all of them are stored or none."""
        self._check_open()
        counted = 0

        def counting() -> Iterable[Sequence[Any]]:
            nonlocal counted
            for row in rows:
                counted += 1
                yield row

        sql = f"INSERT INTO requests ({', '.join(ROW_FIELDS)}) VALUES ({', '.join('?' * len(ROW_FIELDS))})"
        self._write(sql, counting())
        return counted

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait until every record enqueued before this call is stored (later ones may not be)."""
        if self._writer is None or self._closed:
            return
        marker = _Flush()
        self._queue.put(marker)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not marker.done.wait(0.05):
            if not self._writer.is_alive():
                raise StoreError(f"the writer of request store {self.describe()} stopped; see earlier errors.")
            if deadline is not None and time.monotonic() > deadline:
                raise StoreError(f"request store {self.describe()} did not flush within {timeout} s; "
                                 "the database may be locked by another process.")

    def close(self) -> None:
        """Store everything enqueued, stop the writer thread and release connections."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join()
        self._close_connections()

    def __enter__(self) -> "RequestStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure_writer(self) -> None:
        if self._writer is not None:
            return
        with self._start_lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._run_writer, name="llmops-request-store", daemon=True)
                self._writer.start()
                atexit.register(self.close)  # a normal interpreter exit stores what is queued

    def _run_writer(self) -> None:
        sql = f"INSERT INTO requests ({', '.join(ROW_FIELDS)}) VALUES ({', '.join('?' * len(ROW_FIELDS))})"
        stop = False
        while not stop:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.flush_interval
            # collect until the batch is full, the interval ends, or someone waits (flush/stop)
            while len(batch) < self.batch_size and not isinstance(batch[-1], _Flush) and batch[-1] is not _STOP:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            records = [r for r in batch if isinstance(r, dict)]
            stop = any(r is _STOP for r in batch)
            try:
                if records:
                    self._write_batch(sql, records)
            finally:
                for item in batch:
                    if isinstance(item, _Flush):
                        item.done.set()

    def _write_batch(self, sql: str, records: list[dict[str, Any]]) -> None:
        rows = []
        for rec in records:
            try:
                rows.append(record_to_row(rec, self.log_text))
            except Exception as exc:  # one odd record must not lose the batch
                self.write_errors += 1
                self.on_error(f"request record skipped ({type(exc).__name__}: {exc})")
        for attempt in range(5):
            try:
                self._write(sql, rows, writer=True)
                return
            except Exception as exc:
                if attempt == 4:
                    self.write_errors += len(rows)
                    self.on_error(f"could not store {len(rows)} requests in {self.describe()}: {exc}")
                    return
                time.sleep(0.05 * 2**attempt)

    # --- feedback ------------------------------------------------------------------------
    def add_feedback(self, request_id: str, rating: Any, comment: str | None = None,
                     correction: str | None = None, now: float | None = None,
                     client_id: str | None = None) -> Feedback:
        """Record feedback on a logged request, from `client_id` (who rated it) when known.

        Raises `BadFeedbackError` for a rating that is neither thumbs (`up`/`down`) nor 1..5
        and `UnknownRequestError` for an id the store never logged.
        """
        kind, value, positive = normalise_rating(rating)
        return self.record_feedback(Feedback(request_id, value, kind, positive, comment, correction, client_id), now)

    def record_feedback(self, fb: Feedback, now: float | None = None) -> Feedback:
        """Record a `parse_feedback` result; `UnknownRequestError` if its request was never logged."""
        self._check_open()
        if not self.has_request(fb.request_id):
            self.flush()  # the request may still be in the writer's queue
            if not self.has_request(fb.request_id):
                raise UnknownRequestError(f"no logged request has id {fb.request_id!r}; send the `id` of a "
                                          "response this deployment returned.")
        row = (fb.request_id, time.time() if now is None else now, fb.rating_kind, fb.rating, int(fb.positive),
               fb.comment, fb.correction, fb.client_id)
        self._write(f"INSERT INTO feedback ({', '.join(FEEDBACK_FIELDS)}) VALUES "
                    f"({', '.join('?' * len(FEEDBACK_FIELDS))})", [row])
        return fb

    def has_request(self, request_id: str) -> bool:
        return bool(self.query("SELECT 1 FROM requests WHERE id = ? LIMIT 1", (request_id,)))

    # --- reading -------------------------------------------------------------------------
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Run a read query written with `?` placeholders; returns all rows."""
        self._check_open()
        return self._query(sql, tuple(params))

    def scan(self, sql: str, params: Sequence[Any], consume: Callable[[list[tuple]], None],
             batch_size: int | None = None) -> int:
        """Run a read query and call `consume(rows)` on each batch of at most `batch_size`
        rows (default `SCAN_BATCH`), in order, so no more than one batch is held at once;
        returns the row count.
        Byte columns may come as `bytes` or `memoryview` (`b"".join` takes both)."""
        self._check_open()
        return self._scan(sql, tuple(params), consume, max(1, int(batch_size or SCAN_BATCH)))

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"request store {self.describe()} is closed; open it again to use it.")

    def count(self) -> int:
        return int(self.query("SELECT COUNT(*) FROM requests")[0][0])

    @abstractmethod
    def describe(self) -> str:
        """The store's URL without secrets, for messages."""

    # --- backend hooks -------------------------------------------------------------------
    @abstractmethod
    def _write(self, sql: str, rows: Iterable[Sequence[Any]], writer: bool = False) -> None:
        """Execute `sql` for every row in one transaction (on the writer's connection if `writer`)."""

    @abstractmethod
    def _query(self, sql: str, params: tuple) -> list[tuple]:
        """Run a read query written with `?` placeholders (a backend translates them)."""

    def _scan(self, sql: str, params: tuple, consume: Callable[[list[tuple]], None], batch_size: int) -> int:
        """Batches of a read query; a backend streams them (this fallback reads all rows first)."""
        rows = self._query(sql, params)
        for start in range(0, len(rows), batch_size):
            consume(rows[start:start + batch_size])
        return len(rows)

    @abstractmethod
    def _close_connections(self) -> None:
        """Close every connection the store opened."""

