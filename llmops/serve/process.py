"""The model server as a background process: start, wait until healthy, status, stop.

`start_server` runs `python -m llmops.serve` in its own session (so it outlives the
command that started it and can be stopped as a group), sends its output to a log file
and records pid, port and URL in a JSON state file. Everything else works from that
state file alone, so a later `llmops` invocation can find, check and stop the server.

With `monitor_store`, the server logs every request to that request store and accepts
`POST /v1/feedback`; the state file records which store (password removed) and whether
texts are logged (`server_monitor`), so a monitor can tell when the server must restart.
A store URL with a password reaches the server through an environment variable, never
its command line (which the state file and `ps` show).

A state file with a `container` key records a server the Docker runner started
(`llmops.serve.container`); `server_status` and `stop_server` hand it over there.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmops.errors import ProviderError

SERVER_MODULE = "llmops.serve"
MONITOR_STORE_ENV = "LLMOPS_MONITOR_STORE"  # carries a store URL holding a password
_CHILDREN: dict[int, subprocess.Popen] = {}  # keeps Popen objects alive: no ResourceWarning, reapable


class ServeError(ProviderError):
    """The model server could not be started, reached or stopped."""


@dataclass(frozen=True)
class ServerHandle:
    """A started server: `url` is its base (`http://host:port`, no `/v1`)."""

    pid: int
    port: int
    host: str
    url: str
    log_path: str
    state_file: str
    model_name: str


@dataclass(frozen=True)
class ServerStatus:
    """What the state file says, and whether that process is still alive (and healthy, if probed)."""

    running: bool
    pid: int | None = None
    port: int | None = None
    url: str | None = None
    model_name: str | None = None
    log_path: str | None = None
    healthy: bool | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (another process may still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_server(
    state_dir: Path | str,
    name: str,
    model_dir: Path | str,
    *,
    model_name: str | None = None,
    adapter_dir: Path | str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    auth_token_env: str | None = None,
    request_log: Path | str | None = None,
    monitor_store: str | None = None,
    log_text: bool = False,
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
) -> ServerHandle:
    """Start the server in the background; state in `state_dir/NAME.json`, log in `NAME.log`.

    Port 0 picks a free port. Returns at once: call `wait_healthy` before sending requests.
    Refuses to start a second server under the same name while the first still runs.
    `monitor_store` (a request-store URL) turns on request logging and feedback; `log_text`
    also stores prompts and completions (there and in `request_log`).
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file = state_dir / f"{name}.json"
    current = server_status(state_file)
    if current.running:
        raise ServeError(
            f"server '{name}' already runs (pid {current.pid}, {current.url}); stop it first ({state_file})"
        )
    port = port or free_port(host)
    model_name = model_name or name
    log_path = state_dir / f"{name}.log"
    full_env = dict(os.environ)
    full_env.update(env or {})
    args, monitor = server_args(model_dir, adapter_dir, model_name, request_log, monitor_store, log_text, full_env)
    cmd = [sys.executable, "-m", SERVER_MODULE, *args, "--host", host, "--port", str(port)]
    if auth_token_env:
        cmd += ["--auth-token-env", auth_token_env]
    cmd += list(extra_args or [])
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=full_env, start_new_session=True, close_fds=True)
    _CHILDREN[proc.pid] = proc
    url = f"http://{_url_host(host)}:{port}"
    handle = ServerHandle(proc.pid, port, host, url, str(log_path), str(state_file), model_name)
    state = dict(asdict(handle), started_at=time.time(), command=cmd[1:], monitor=monitor)
    _write_json(state_file, state)
    return handle


def server_args(model_dir, adapter_dir, model_name: str, request_log, monitor_store: str | None,
                 log_text: bool, env: dict[str, str]) -> tuple[list[str], dict[str, Any] | None]:
    """The server's arguments (those of the local runner) and the state's `monitor` entry.

    A store URL holding a password goes into `env`, never the arguments.
    """
    args = ["--model-dir", str(model_dir), "--model-name", model_name]
    if adapter_dir is not None:
        args += ["--adapter-dir", str(adapter_dir)]
    if request_log is not None:
        args += ["--request-log", str(request_log)]
    monitor = None
    if monitor_store:
        from llmops.monitor.run import public_url

        if public_url(monitor_store) != monitor_store:
            env[MONITOR_STORE_ENV] = monitor_store
            args += ["--monitor-store-env", MONITOR_STORE_ENV]
        else:
            args += ["--monitor-store", monitor_store]
        monitor = {"store": public_url(monitor_store), "log_text": bool(log_text)}
    if log_text:
        args += ["--log-text"]
    return args, monitor


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_state(state_file: Path | str) -> dict[str, Any] | None:
    try:
        return json.loads(Path(state_file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ServeError(f"server state file {state_file} is unreadable ({exc}); delete it and start again") from None


def _alive(pid: int) -> bool:
    """Whether `pid` runs (zombies count as gone; our own children are reaped here)."""
    proc = _CHILDREN.get(pid)
    if proc is not None:
        if proc.poll() is not None:
            _CHILDREN.pop(pid, None)
            return False
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_our_server(pid: int) -> bool:
    """Guard against pid reuse: the process's command line must be our server module."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (macOS): trust the state file
    return SERVER_MODULE.encode() in cmdline


def _log_tail(path: str | None, lines: int = 20) -> str:
    if not path:
        return ""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _get_json(url: str, timeout: float) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode("utf-8"))


def wait_healthy(url: str, timeout: float = 120.0, handle: ServerHandle | None = None) -> dict[str, Any]:
    """Poll `URL/health` until it answers 200; returns its JSON body.

    With `handle`, a server process that exits while we wait fails at once, with the end of
    its log in the message.
    """
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        if handle is not None and not _alive(handle.pid):
            raise ServeError(
                f"the model server (pid {handle.pid}) exited while starting; its log {handle.log_path} ends with:\n"
                f"{_log_tail(handle.log_path)}"
            )
        try:
            return _get_json(url.rstrip("/") + "/health", timeout=5.0)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = str(getattr(exc, "reason", exc))
        if time.monotonic() >= deadline:
            tail = f"; its log ends with:\n{_log_tail(handle.log_path)}" if handle else ""
            raise ServeError(f"{url}/health did not answer within {timeout:g}s (last error: {last}){tail}")
        time.sleep(0.2)


def server_status(state_file: Path | str, probe: bool = False) -> ServerStatus:
    """The server recorded in `state_file`: running or not (no state file: not running).

    With `probe`, also GET /health (`healthy`: True/False; None when not probed).
    """
    state = _read_state(state_file)
    if state is None:
        return ServerStatus(running=False)
    if "container" in state:  # started by the Docker runner
        from llmops.serve.container import container_status

        return container_status(state, probe=probe)
    pid = int(state["pid"])
    running = _alive(pid) and _is_our_server(pid)
    healthy = None
    if probe:
        healthy = False
        if running:
            try:
                healthy = _get_json(str(state["url"]) + "/health", timeout=5.0).get("status") == "ok"
            except (urllib.error.URLError, OSError, ValueError):
                healthy = False
    return ServerStatus(running, pid, int(state["port"]), str(state["url"]), state.get("model_name"),
                        state.get("log_path"), healthy)


def server_monitor(state_file: Path | str) -> dict[str, Any] | None:
    """`{"store": URL without password, "log_text": bool}` of the server recorded in
    `state_file`, or None when it logs to no request store (or no state file exists)."""
    state = _read_state(state_file)
    monitor = (state or {}).get("monitor")
    return dict(monitor) if isinstance(monitor, dict) else None


def stop_server(state_file: Path | str, timeout: float = 15.0) -> bool:
    """Stop the server recorded in `state_file` (SIGTERM to its process group, SIGKILL after
    `timeout`) and remove the state file. Returns whether a running server was stopped."""
    state = _read_state(state_file)
    if state is None:
        return False
    if "container" in state:  # started by the Docker runner
        from llmops.serve.container import stop_container

        return stop_container(state_file, state, timeout=timeout)
    pid = int(state["pid"])
    was_running = _alive(pid) and _is_our_server(pid)
    if was_running:
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            _signal_group(pid, signal.SIGKILL)
            while _alive(pid) and time.monotonic() < deadline + 5:
                time.sleep(0.1)
    Path(state_file).unlink(missing_ok=True)
    return was_running


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the server leads its own session: pgid == pid
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        raise ServeError(f"not allowed to stop the server (pid {pid}): {exc}") from None
