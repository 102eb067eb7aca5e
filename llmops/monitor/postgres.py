"""The request store over PostgreSQL (`store: postgresql://...`), for teams running several servers.

Same tables and semantics as `SqliteStore` (append-only, one transaction per batch); it
needs psycopg 3 (`pip install "psycopg[binary]"`), imported only when such a store is opened.
Opening a store made before feedback had a client adds `feedback.client` under the same
advisory lock that serialises table creation.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Sequence

from llmops.monitor.errors import StoreError
from llmops.redact import redact_url
from llmops.monitor.backend import SCHEMA_VERSION, RequestStore

POSTGRES_DDL = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS requests (seq BIGSERIAL PRIMARY KEY, id TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, "
    "client TEXT, path TEXT, status INTEGER, error TEXT, latency_ms DOUBLE PRECISION, prompt_tokens INTEGER, "
    "completion_tokens INTEGER, prompt_chars INTEGER, prompt_words INTEGER, injection INTEGER, "
    "token_bag BYTEA, prompt TEXT, completion TEXT, inputs TEXT)",
    "ALTER TABLE requests ADD COLUMN IF NOT EXISTS inputs TEXT",  # stores made before requests kept inputs
    "CREATE INDEX IF NOT EXISTS requests_id ON requests (id)",
    "CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts)",
    "CREATE TABLE IF NOT EXISTS feedback (seq BIGSERIAL PRIMARY KEY, request_id TEXT NOT NULL, "
    "ts DOUBLE PRECISION NOT NULL, rating_kind TEXT NOT NULL, rating INTEGER NOT NULL, positive INTEGER NOT NULL, "
    "comment TEXT, correction TEXT, client TEXT)",
    "ALTER TABLE feedback ADD COLUMN IF NOT EXISTS client TEXT",  # stores made before feedback had a client
    "CREATE INDEX IF NOT EXISTS feedback_request ON feedback (request_id)",
)


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StoreError('a postgresql:// request store needs psycopg 3: run `pip install "psycopg[binary]"`, '
                         "or use the default SQLite store.") from None
    return psycopg


def _sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class PostgresStore(RequestStore):
    """Requests and feedback in PostgreSQL tables; the writer thread has its own connection."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._psycopg = _psycopg()
        self.url = url.replace("postgresql+psycopg://", "postgresql://", 1)
        self._lock = threading.Lock()
        self._writer_conn: Any = None
        self._main_conn: Any = None
        conn = self._conn()
        with self._lock, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(74616)")  # servers starting together create tables once
            for ddl in POSTGRES_DDL:
                conn.execute(ddl)
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', %s) ON CONFLICT DO NOTHING",
                         (str(SCHEMA_VERSION),))
        version = self.query("SELECT value FROM meta WHERE key = 'schema_version'")[0][0]
        if int(version) > SCHEMA_VERSION:
            raise StoreError(f"request store {self.describe()} has schema {version}, newer than this llmops "
                             f"({SCHEMA_VERSION}); upgrade llmops.")

    def describe(self) -> str:
        return redact_url(self.url)

    def _connect(self) -> Any:
        try:
            return self._psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except self._psycopg.Error as exc:
            raise StoreError(f"cannot connect to request store {self.describe()}: {str(exc).strip()}; check the "
                             "monitor's `store:` URL and that the server is reachable.") from None

    def _conn(self, writer: bool = False) -> Any:
        if writer:
            if self._writer_conn is None or self._writer_conn.closed:
                self._writer_conn = self._connect()
            return self._writer_conn
        if self._main_conn is None or self._main_conn.closed:
            self._main_conn = self._connect()
        return self._main_conn

    def _write(self, sql: str, rows: Iterable[Sequence[Any]], writer: bool = False) -> None:
        if writer:
            self._write_on(self._conn(writer=True), sql, rows)
            return
        with self._lock:
            self._write_on(self._conn(), sql, rows)

    def _write_on(self, conn: Any, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(_sql(sql), rows)

    def _query(self, sql: str, params: tuple) -> list[tuple]:
        with self._lock, self._conn().cursor() as cur:
            cur.execute(_sql(sql), params)
            return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in cur.fetchall()]

    def _scan(self, sql: str, params: tuple, consume: Callable[[list[tuple]], None], batch_size: int) -> int:
        # A server-side cursor on a connection of its own: the server keeps the result and
        # sends `batch_size` rows per FETCH; `consume` may use the store meanwhile.
        conn = self._connect()
        try:
            with conn.transaction(), conn.cursor(name="llmops_scan") as cur:
                cur.execute(_sql(sql), params)
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
                if conn is not None and not conn.closed:
                    conn.close()
            self._writer_conn = self._main_conn = None
