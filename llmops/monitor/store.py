"""The append-only request store: requests and feedback, written in the background.

`RequestStore` (defined in `backend`) is the interface the server hook and the monitor use;
`SqliteStore` is the embedded default (WAL journal, one transaction per batch, so a crash mid-batch leaves only
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

import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

# RequestStore is defined in `backend` (below this module and `postgres`) and importable from here
from llmops.monitor.backend import SCHEMA_VERSION, RequestStore
from llmops.monitor.errors import StoreError
from llmops.redact import redact_url

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
