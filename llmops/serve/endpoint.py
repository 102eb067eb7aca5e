"""What every kind of model server shares: its state file, its port, its /health answer, its pid.

Both runners (`llmops.serve.process` for a local process, `llmops.serve.container` for a
Docker container) start the same `python -m llmops.serve` with `server_args`, record it in
a JSON state file (`read_state`), and count it as up only while it answers /health with
the random instance token it was started with (`answers_as`). `llmops.serve.control`
dispatches status and stop between them by the state file's kind. This module imports
neither runner, so both can build on it.

`server_status` reads either kind's state file (read-only: it starts and stops nothing).
`pid_alive` is the one liveness check for a process: a zombie (exited, not yet reaped by
its parent) counts as gone.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmops.errors import ProviderError

SERVER_MODULE = "llmops.serve"
MONITOR_STORE_ENV = "LLMOPS_MONITOR_STORE"  # carries a store URL holding a password
HTTP_ERRORS = (OSError, ValueError, http.client.HTTPException)  # what a GET of /health may raise


class ServeError(ProviderError):
    """The model server could not be started, reached or stopped."""


@dataclass(frozen=True)
class ServerStatus:
    """What the state file says, and whether that process is still alive (and, if probed,
    `healthy`: alive and /health answered with the recorded `instance` token)."""

    running: bool
    pid: int | None = None
    port: int | None = None
    url: str | None = None
    model_name: str | None = None
    log_path: str | None = None
    healthy: bool | None = None
    instance: str | None = None


# -- the state file --------------------------------------------------------------------
def read_state(state_file: Path | str) -> dict[str, Any] | None:
    """The JSON object in `state_file`, or None when there is none."""
    try:
        return json.loads(Path(state_file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ServeError(f"server state file {state_file} is unreadable ({exc}); delete it and start again") from None


def is_container_state(state: dict[str, Any]) -> bool:
    """Whether a state file records a server in a container (it names the container)."""
    return "container" in state


def server_status(state_file: Path | str, probe: bool = False) -> ServerStatus:
    """The server recorded in `state_file`, of either kind: running or not (no state file:
    not running). A local process runs while its pid does and runs our server module; a
    container while the engine says so (an engine that does not answer: not running).

    With `probe`, also GET /health (`healthy`: True only when the recorded server runs and
    answers with the recorded instance token; None when not probed).
    """
    state = read_state(state_file)
    if state is None:
        return ServerStatus(running=False)
    pid: int | None = None
    if is_container_state(state):  # started by the Docker runner
        from llmops.errors import LlmopsError
        from llmops.runners.docker import DockerRunner

        try:
            running = DockerRunner(docker_host=state.get("docker_host")).is_running(str(state["container"]))
        except LlmopsError:
            running = False
    else:
        pid = int(state["pid"])
        running = pid_alive(pid) and is_our_server(pid, str(state.get("module") or SERVER_MODULE))
    healthy = (running and answers_as(str(state["url"]), state.get("instance"))) if probe else None
    return ServerStatus(running, pid, int(state["port"]), str(state["url"]), state.get("model_name"),
                        state.get("log_path"), healthy, state.get("instance"))


def server_monitor(state_file: Path | str) -> dict[str, Any] | None:
    """`{"store": URL without password, "log_text": bool}` of the server recorded in
    `state_file`, or None when it logs to no request store (or no state file exists)."""
    state = read_state(state_file)
    monitor = (state or {}).get("monitor")
    return dict(monitor) if isinstance(monitor, dict) else None


# -- processes ---------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs. A zombie (exited, not yet reaped by its parent: state Z in
    /proc/PID/stat) does not. Without /proc (macOS), whether signal 0 reaches it."""
    if pid <= 0:  # 0 and below name process groups, not a process
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return False  # /proc is there and has no such process
        stat = None
    except OSError:
        stat = None
    if stat is not None:
        fields = stat.rsplit(")", 1)[-1].split()  # after "(comm)", which may hold spaces and ')'
        return not fields or fields[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def is_our_server(pid: int, module: str = SERVER_MODULE) -> bool:
    """Guard against pid reuse: the process's command line must be our server module."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (macOS): trust the state file
    return module.encode() in cmdline


def log_tail(path: str | None, lines: int = 20) -> str:
    """The last `lines` lines of the log at `path` ('' when there is none)."""
    if not path:
        return ""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- the server's arguments --------------------------------------------------------------
def server_args(model_dir, adapter_dir, model_name: str, request_log, monitor_store: str | None,
                log_text: bool, env: dict[str, str], served_file=None) -> tuple[list[str], dict[str, Any] | None]:
    """The server's arguments (those of the local runner) and the state's `monitor` entry.

    A store URL holding a password goes into `env`, never the arguments. `served_file` is
    the deployment's JSON description of what is served (`llmops.serve.main`, --served-file).
    """
    args = ["--model-dir", str(model_dir), "--model-name", model_name]
    if adapter_dir is not None:
        args += ["--adapter-dir", str(adapter_dir)]
    if served_file is not None:
        args += ["--served-file", str(served_file)]
    if request_log is not None:
        args += ["--request-log", str(request_log)]
    monitor = None
    if monitor_store:
        from llmops.redact import redact_url

        if redact_url(monitor_store) != monitor_store:
            env[MONITOR_STORE_ENV] = monitor_store
            args += ["--monitor-store-env", MONITOR_STORE_ENV]
        else:
            args += ["--monitor-store", monitor_store]
        monitor = {"store": redact_url(monitor_store), "log_text": bool(log_text)}
    if log_text:
        args += ["--log-text"]
    return args, monitor


# -- ports and URLs ----------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (another process may still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def url_host(host: str) -> str:
    """HOST as the host part of a URL a client here can reach (a wildcard bind: loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def check_port(host: str, port: int, name: str) -> None:
    """Fail unless `host:port` can be bound now (as the server binds it: SO_REUSEADDR, so a
    connection still closing does not count); the error names what holds it and the fix."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return
        except OSError as exc:
            problem = exc
    where = f"server '{name}' cannot start on {host}:{port}"
    if problem.errno != errno.EADDRINUSE:
        raise ServeError(f"{where}: {problem.strerror or problem}; choose another serve.host or serve.port.")
    body = health(f"http://{url_host(host)}:{port}", timeout=2.0)
    if body is not None and _is_llmops(body):
        pid = body["pid"]
        if pid_alive(pid) and is_our_server(pid):
            fix = f"stop it with `kill {pid}`"
        else:  # its pid is no server process here: it runs in a container (pid of its own namespace)
            fix = "find its container with `docker ps --filter label=llmops.managed` and remove it (`docker rm -f ID`)"
        raise ServeError(f"{where}: {describe_health(body)} still holds port {port}, perhaps orphaned after "
                         f".llmops/ was deleted: {fix}, or choose another serve.port.")
    what = "a program that is not an llmops server answers HTTP" if body is not None else "another program listens"
    raise ServeError(f"{where}: {what} on port {port}; find it with `ss -ltnp 'sport = :{port}'` and stop it, "
                     "or choose another serve.port.")


# -- /health -------------------------------------------------------------------------------
def get_json(url: str, timeout: float) -> dict[str, Any]:
    """GET URL and parse its JSON body (raises what urlopen and json.loads raise)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode("utf-8"))


def health(url: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """GET `URL/health`: its JSON object, `{}` for any other HTTP answer, None when nothing answers."""
    try:
        body = get_json(url.rstrip("/") + "/health", timeout=timeout)
    except urllib.error.HTTPError:
        return {}
    except ValueError:  # not JSON
        return {}
    except (OSError, http.client.HTTPException):
        return None
    return body if isinstance(body, dict) else {}


def _is_llmops(body: dict[str, Any]) -> bool:
    # A pid of 0 or below would make `kill PID` (and our liveness check) mean a process group.
    pid = body.get("pid")
    return body.get("status") == "ok" and "model" in body and type(pid) is int and pid > 0


def describe_health(body: dict[str, Any]) -> str:
    """Who gave this /health answer, for messages: 'an llmops server (pid N, model M)' or not.
    The model name is whatever the other side said: one line, at most 100 characters."""
    if _is_llmops(body):
        model = " ".join(str(body.get("model")).split())[:100]
        return f"an llmops server (pid {body['pid']}, model {model})"
    return "a program that is not an llmops server"


def answers_as(url: str, instance: str | None) -> bool:
    """Whether `URL/health` answers ok with `instance` (a server we started; no token: False)."""
    if not instance:
        return False
    body = health(url)
    return body is not None and body.get("status") == "ok" and body.get("instance") == instance


def other_server_at(url: str, instance: str | None = None) -> str | None:
    """Who answers `URL/health` if it is not the server started with `instance` (see
    `describe_health`); None when nothing answers there, or that server does."""
    body = health(url, timeout=2.0)
    if body is None or (instance and body.get("instance") == instance):
        return None
    return describe_health(body)
