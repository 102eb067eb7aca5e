"""The append-only request store: requests and feedback, written in the background.

`RequestStore` is the interface the server hook and the monitor use; `SqliteStore` is the
embedded default (WAL journal, one transaction per batch, so a crash mid-batch leaves only
whole batches), `llmops.monitor.postgres.PostgresStore` the same over PostgreSQL.
`open_store(url)` picks one from the URL.

Writes never run on the request thread: `log(record)` (also `store(record)`, so a store is
an `on_request` hook) only enqueues; a writer thread drains the queue in batches.
`flush()` waits for everything enqueued so far; `close()` flushes and stops the thread.
SQL in this package is written with `?` placeholders; a store translates it for its driver.
`query` returns all rows; `scan` hands them over in batches (`SCAN_BATCH` rows), so the
monitor reads a million requests in bounded memory (PostgreSQL: a server-side cursor).

Stores made before feedback recorded its client (or requests their prompt variables) lack
the `feedback.client` (`requests.inputs`) column; opening one adds it (in one transaction,
under the database's write lock, so servers opening the store together migrate it once). The
change is additive: the schema version stays 1 and an older llmops still writes to a migrated
store (its ratings carry no client id, its requests no inputs).
"""

from __future__ import annotations

import atexit
import queue
from abc import ABC, abstractmethod
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from llmops.monitor.errors import StoreError, UnknownRequestError
from llmops.monitor.feedback import Feedback, normalise_rating
from llmops.monitor.records import ROW_FIELDS, record_to_row
from llmops.redact import redact_url

SCHEMA_VERSION = 1
SKIP_PATHS = ("/health", "/v1/models", "/v1/feedback")  # not model traffic: not logged by default
FEEDBACK_FIELDS = ("request_id", "ts", "rating_kind", "rating", "positive", "comment", "correction", "client")
SCAN_BATCH = 16_384  # rows per batch that `scan` hands over
_STOP = object()


class _Flush:
    """A queue marker: the writer sets `done` once everything queued before it is stored."""

    def __init__(self) -> None:
        self.done = threading.Event()


SQLITE_DDL = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS requests (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, ts REAL NOT NULL, "
    "client TEXT, path TEXT, status INTEGER, error TEXT, latency_ms REAL, prompt_tokens INTEGER, "
    "completion_tokens INTEGER, prompt_chars INTEGER, prompt_words INTEGER, injection INTEGER, "
    "token_bag BLOB, prompt TEXT, completion TEXT, inputs TEXT)",
    "CREATE INDEX IF NOT EXISTS requests_id ON requests (id)",
    "CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts)",
    "CREATE TABLE IF NOT EXISTS feedback (seq INTEGER PRIMARY KEY, request_id TEXT NOT NULL, ts REAL NOT NULL, "
    "rating_kind TEXT NOT NULL, rating INTEGER NOT NULL, positive INTEGER NOT NULL, comment TEXT, correction TEXT, "
    "client TEXT)",
    "CREATE INDEX IF NOT EXISTS feedback_request ON feedback (request_id)",
)


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


class SqliteStore(RequestStore):
    """The embedded store: one SQLite file in WAL mode; the writer thread has its own connection."""

    def __init__(self, path: Path | str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the folder of request store {self.path}: {exc}") from None
        self._lock = threading.Lock()
        self._writer_conn: sqlite3.Connection | None = None
        self._main_conn: sqlite3.Connection | None = None
        try:
            conn = self._conn()
        except sqlite3.Error as exc:
            raise StoreError(f"request store {self.path} cannot be opened ({exc}); check the path and its "
                             "permissions.") from None
        try:
            for ddl in SQLITE_DDL:
                conn.execute(ddl)
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))
            conn.commit()
            _migrate_sqlite(conn)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"request store {self.path} cannot be opened ({exc}); move the file away to start "
                             "a new log.") from None
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        if int(version) > SCHEMA_VERSION:
            raise StoreError(f"request store {self.path} has schema {version}, newer than this llmops "
                             f"({SCHEMA_VERSION}); upgrade llmops.")

    def describe(self) -> str:
        return str(self.path)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # with WAL: never corrupt; a power loss may drop the last commit
        return conn

    def _conn(self, writer: bool = False) -> sqlite3.Connection:
        """The writer thread's own connection, or the shared one (used under `_lock`)."""
        if writer:
            if self._writer_conn is None:
                self._writer_conn = self._connect()
            return self._writer_conn
        if self._main_conn is None:
            self._main_conn = self._connect()
        return self._main_conn

    def _write(self, sql: str, rows: Iterable[Sequence[Any]], writer: bool = False) -> None:
        if writer:
            conn = self._conn(writer=True)
            with conn:  # one transaction: all rows or none
                conn.executemany(sql, rows)
            return
        with self._lock:
            conn = self._conn()
            with conn:
                conn.executemany(sql, rows)

    def _query(self, sql: str, params: tuple) -> list[tuple]:
        with self._lock:
            return self._conn().execute(sql, params).fetchall()

    def _scan(self, sql: str, params: tuple, consume: Callable[[list[tuple]], None], batch_size: int) -> int:
        # Its own connection, so `consume` may use the store meanwhile; the one statement
        # reads one snapshot of the WAL from its first batch to its last.
        conn = self._connect()
        try:
            cur = conn.execute(sql, params)
            total = 0
            while rows := cur.fetchmany(batch_size):
                total += len(rows)
                consume(rows)
            return total
        finally:
            conn.close()

    def _close_connections(self) -> None:
        with self._lock:
            for conn in (self._writer_conn, self._main_conn):
                if conn is not None:
                    conn.close()
            self._writer_conn = self._main_conn = None


_ADDED_COLUMNS = (("feedback", "client"), ("requests", "inputs"))  # (table, TEXT column) added since schema 1


def _migrate_sqlite(conn: sqlite3.Connection) -> None:
    """Add the columns a store made before them lacks (see the module docstring)."""

    def missing() -> list[tuple[str, str]]:
        return [(t, c) for t, c in _ADDED_COLUMNS if c not in {row[1] for row in conn.execute(f"PRAGMA table_info({t})")}]

    if not missing():
        return
    conn.execute("BEGIN IMMEDIATE")  # the write lock: another process may be migrating too
    try:
        for table, column in missing():
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


def open_store(url: str, log_text: bool = False, **kwargs: Any) -> RequestStore:
    """A store for `sqlite:///PATH` (absolute, see `spec.store_url`) or `postgresql://...`."""
    if url.startswith(("postgresql://", "postgresql+", "postgres://")):
        from llmops.monitor.postgres import PostgresStore

        return PostgresStore(url, log_text=log_text, **kwargs)
    if url.startswith("sqlite") and "://" in url:
        path = url.split("://", 1)[1]
        path = path[1:] if path.startswith("/") and not path.startswith("//") else path
        if path.startswith("//"):
            path = path[1:]
        return SqliteStore(path, log_text=log_text, **kwargs)
    raise StoreError(f"request store URL {redact_url(url)!r} is neither sqlite:///PATH nor postgresql://...; fix the "
                     "monitor's `store:` setting.")
