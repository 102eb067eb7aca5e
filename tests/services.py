"""Real services for the tests, each on 127.0.0.1 on a free port: a throwaway PostgreSQL
cluster, an `mlflow server`, moto's S3 server.

Each helper is a context manager: it starts the service, waits (bounded) until it answers,
yields how to reach it, and at exit stops it and removes its data. A service that cannot
run on this machine at all (no PostgreSQL binaries, root without a `postgres` user, moto
not installed) raises `ServiceUnavailable(reason)`, which fixtures turn into a skip; a
service that should run but fails to start raises `ServiceError` carrying its log's tail,
so CI fails loudly instead of skipping.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

LOG_TAIL = 4000  # characters of a service log shown in a failure message


class ServiceUnavailable(Exception):
    """The service cannot run on this machine; `reason` says why (fixtures skip with it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ServiceError(RuntimeError):
    """The service should run here but did not start or answer; the message holds its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, limit: int = LOG_TAIL) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError as exc:
        return f"(no log: {exc})"


# --- PostgreSQL -------------------------------------------------------------------------


@dataclass(frozen=True)
class PostgresCluster:
    """A running cluster with a role `mlflow` (password auth over TCP) owning databases `mlflow`
    and `requests` (for a monitor's request store)."""

    port: int
    password: str
    user: str = "mlflow"
    database: str = "mlflow"

    @property
    def uri(self) -> str:
        """SQLAlchemy URI (psycopg 3 driver) with the password: what `mlflow server` gets."""
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    @property
    def requests_uri(self) -> str:
        """A monitor request-store URL (with the password) for database `requests`."""
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/requests"


def _postgres_bindir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    found = candidates[-1] if candidates else shutil.which("initdb")
    if not found:
        raise ServiceUnavailable("PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or on PATH)")
    return Path(os.path.realpath(found)).parent


def _as_cluster_owner(tmp: Path) -> list[str]:
    """The command prefix that runs PostgreSQL's tools as a non-root user (postgres refuses root)."""
    if os.geteuid() != 0:
        return []
    try:
        import pwd

        owner = pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceUnavailable("running as root and there is no `postgres` user to own the cluster") from None
    runuser = shutil.which("runuser")
    if runuser is None:
        raise ServiceUnavailable("running as root and `runuser` is missing (needed to run as `postgres`)")
    os.chown(tmp, owner.pw_uid, owner.pw_gid)
    probe = subprocess.run([runuser, "-u", "postgres", "--", "test", "-w", str(tmp)], capture_output=True)
    if probe.returncode != 0:
        blocked = next((str(p) for p in reversed(tmp.parents) if not os.stat(p).st_mode & 0o001), "?")
        raise ServiceUnavailable(
            f"the `postgres` user cannot reach {tmp} ({blocked} is not traversable by others); "
            "use a temp dir directly under /tmp")
    return [runuser, "-u", "postgres", "--"]


@contextmanager
def postgres_cluster(tmp: Path, start_timeout: float = 60) -> Iterator[PostgresCluster]:
    """initdb + pg_ctl start a cluster in `tmp` (which becomes the cluster owner's; removed at
    exit). Local socket connections (in `tmp/socket`) trust; TCP on 127.0.0.1 needs the
    password, so the yielded `uri` really exercises password authentication."""
    bindir = _postgres_bindir()
    tmp.mkdir(parents=True, exist_ok=True)
    prefix = _as_cluster_owner(tmp)
    data, sockdir, logfile = tmp / "data", tmp / "socket", tmp / "postgres.log"
    password = secrets.token_urlsafe(16)

    def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=timeout)

    def fail(what: str, proc: subprocess.CompletedProcess[str]) -> ServiceError:
        output = (proc.stdout + proc.stderr)[-LOG_TAIL:]
        return ServiceError(f"PostgreSQL: {what}\n{output}\n--- {logfile} ---\n{log_tail(logfile)}")

    port = 0
    started = False
    try:
        # As the owner: a socket folder made by root would be unwritable to it.
        proc = run("mkdir", "-p", str(sockdir))
        if proc.returncode != 0:
            raise fail("making the socket folder failed", proc)
        # No locale dependency: C collation with UTF8 works whatever the machine's locales are.
        proc = run(str(bindir / "initdb"), "-D", str(data), "--no-locale", "--encoding=UTF8",
                   "--username=postgres", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync")
        if proc.returncode != 0:
            raise fail("initdb failed", proc)
        for _attempt in range(3):  # a free port can be taken between choosing and binding it
            port = free_port()
            options = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={sockdir} "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=16MB")
            proc = run(str(bindir / "pg_ctl"), "start", "-D", str(data), "-l", str(logfile), "-w",
                       "-t", str(int(start_timeout)), "-o", options, timeout=start_timeout + 30)
            if proc.returncode == 0:
                started = True
                break
            if "could not bind" not in log_tail(logfile) and "already in use" not in log_tail(logfile):
                break
        if not started:
            raise fail(f"pg_ctl start failed (port {port})", proc)
        proc = run(str(bindir / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-h", str(sockdir), "-p", str(port),
                   "-U", "postgres", "-d", "postgres",
                   "-c", f"CREATE ROLE mlflow LOGIN PASSWORD '{password}'",  # token_urlsafe: no quotes
                   "-c", "CREATE DATABASE mlflow OWNER mlflow", "-c", "CREATE DATABASE requests OWNER mlflow")
        if proc.returncode != 0:
            raise fail("creating the mlflow role and database failed", proc)
        yield PostgresCluster(port=port, password=password)
    finally:
        if started:
            run(str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w", "-t", "30", timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


# --- HTTP services in their own process group --------------------------------------------


def _wait_http(url: str, proc: subprocess.Popen[bytes], logfile: Path, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if proc.poll() is not None:
                raise ServiceError(f"{name} exited with {proc.returncode}:\n{log_tail(logfile)}") from None
            time.sleep(0.3)
    raise ServiceError(f"{name} did not answer {url} within {timeout:.0f} s:\n{log_tail(logfile)}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group: mlflow's server runs worker children
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextmanager
def http_service(name: str, command: Callable[[int], list[str]], health_path: str, *,
                 log_file: Path | None = None, env: Mapping[str, str] | None = None,
                 timeout: float = 90) -> Iterator[str]:
    """Run `command(port)` on a free port until it answers GET `health_path`; yield its URL.
    Output goes to `log_file` (default: a temp file removed at exit), whose tail is in any
    failure message. A port taken between choosing and binding it is retried."""
    own_log = log_file is None
    if log_file is None:
        fd, path = tempfile.mkstemp(prefix=f"{name.replace(' ', '-')}-", suffix=".log")
        os.close(fd)
        log_file = Path(path)
    full_env = {**os.environ, **(env or {})}
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _attempt in range(3):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            with open(log_file, "ab") as log:
                proc = subprocess.Popen(command(port), stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
            try:
                _wait_http(url + health_path, proc, log_file, name, timeout)
                break
            except ServiceError:
                _stop(proc)
                if "address already in use" not in log_tail(log_file).lower():
                    raise
        yield url
    finally:
        if proc is not None:
            _stop(proc)
        if own_log:
            log_file.unlink(missing_ok=True)


# --- mlflow server ----------------------------------------------------------------------


@contextmanager
def mlflow_server(backend_uri: str, artifacts_dir: Path | str, *, log_file: Path | None = None,
                  env: Mapping[str, str] | None = None, timeout: float = 90) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with proxied artifacts (`--serve-artifacts`) stored
    under `artifacts_dir` (a folder, or a URL such as `s3://bucket/mlflow` with `env` saying how
    to reach it, e.g. MLFLOW_S3_ENDPOINT_URL). Yields the tracking URL. MLflow's default
    `--allowed-hosts` already admits 127.0.0.1 with any port."""

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
                "--serve-artifacts", "--artifacts-destination", str(artifacts_dir),
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]

    # No job runner: MLflow 3's server otherwise starts huey consumer processes for its GenAI
    # jobs, which llmops never submits (about 2 s more to start and CPU while it runs).
    with http_service("mlflow server", command, "/health", log_file=log_file, timeout=timeout,
                      env={"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                           **(env or {})}) as url:
        yield url


# --- S3 (moto) --------------------------------------------------------------------------


@contextmanager
def moto_s3_server(log_file: Path | None = None, timeout: float = 60) -> Iterator[str]:
    """moto's S3 (and every other AWS API) in server mode, `python -m moto.server` on
    127.0.0.1 in its own process; yields the endpoint URL. Nothing is patched or set
    globally: clients reach it only through that URL (any credentials, e.g. `testing`)."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        raise ServiceUnavailable("moto[server] is not installed (pip install -e '.[dev]')")

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]

    with http_service("moto server", command, "/moto-api/data.json", log_file=log_file, timeout=timeout) as url:
        yield url
