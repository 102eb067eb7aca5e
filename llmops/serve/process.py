"""The model server as a background process: start, wait until healthy, status, stop.

`start_server` runs `python -m llmops.serve` in its own session (so it outlives the
command that started it and can be stopped as a group), sends its output to a log file
and records pid, port, URL and an instance token in a JSON state file. Everything else
works from that state file alone, so a later `llmops` invocation can find, check and stop
the server.

Only our own server counts as up: the starter hands it a random instance token (in
`LLMOPS_SERVE_INSTANCE`, see `llmops.serve.server.INSTANCE_ENV`), /health repeats it, and
`wait_healthy` and `server_status(probe=True)` accept an answer only with that token while
the recorded process still runs. Anything else answering on the port (an orphaned server
after `.llmops/` was deleted, another program) is not "healthy". A fixed port is checked
before starting: a taken one fails at once, naming what holds it and how to free it.

The server inherits this process's environment minus credentials (`server_env`).

With `monitor_store`, the server logs every request to that request store and accepts
`POST /v1/feedback`; the state file records which store (password removed) and whether
texts are logged (`server_monitor`), so a monitor can tell when the server must restart.
A store URL with a password reaches the server through an environment variable, never
its command line (which the state file and `ps` show).

A state file with a `container` key records a server the Docker runner started
(`llmops.serve.container`); `server_status` and `stop_server` hand it over there.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from llmops.errors import ProviderError
from llmops.fsutil import atomic_write_json
from llmops.serve.server import INSTANCE_ENV

SERVER_MODULE = "llmops.serve"
MONITOR_STORE_ENV = "LLMOPS_MONITOR_STORE"  # carries a store URL holding a password
_CHILDREN: dict[int, subprocess.Popen] = {}  # keeps Popen objects alive: no ResourceWarning, reapable
# Names of variables that hold credentials (TOKENIZERS_PARALLELISM is a setting, not a token).
_CREDENTIAL_NAME = re.compile(r"TOKEN(?!IZER)|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|PRIVATE_?KEY")
HTTP_ERRORS = (OSError, ValueError, http.client.HTTPException)  # what a GET of /health may raise


class ServeError(ProviderError):
    """The model server could not be started, reached or stopped."""


@dataclass(frozen=True)
class ServerHandle:
    """A started server: `url` is its base (`http://host:port`, no `/v1`); its /health
    answers with `instance`, the random token it was started with."""

    pid: int
    port: int
    host: str
    url: str
    log_path: str
    state_file: str
    model_name: str
    instance: str


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
    served_file: Path | str | None = None,
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    module: str = SERVER_MODULE,
) -> ServerHandle:
    """Start the server in the background; state in `state_dir/NAME.json`, log in `NAME.log`.

    Port 0 picks a free port; a fixed port that something else holds fails at once.
    Returns at once: call `wait_healthy` before sending requests. Refuses to start a second
    server under the same name while the first still runs. `monitor_store` (a request-store
    URL) turns on request logging and feedback; `log_text` also stores prompts and
    completions (there and in `request_log`). The server gets `server_env` of this
    process's environment, plus `env` as given. `module` is what runs (`python -m MODULE`;
    the logging proxy of `serve.engine: vllm` is `llmops.serve.proxy`), with the same arguments.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file = state_dir / f"{name}.json"
    current = server_status(state_file)
    if current.running:
        raise ServeError(
            f"server '{name}' already runs (pid {current.pid}, {current.url}); stop it first ({state_file})"
        )
    if port:
        check_port(host, port, name)
    port = port or free_port(host)
    model_name = model_name or name
    log_path = state_dir / f"{name}.log"
    full_env = server_env(os.environ, keep=[auth_token_env] if auth_token_env else [])
    full_env.update(env or {})
    args, monitor = server_args(model_dir, adapter_dir, model_name, request_log, monitor_store, log_text, full_env,
                                served_file)
    instance = full_env[INSTANCE_ENV] = secrets.token_urlsafe(16)
    cmd = [sys.executable, "-m", module, *args, "--host", host, "--port", str(port)]
    if auth_token_env:
        cmd += ["--auth-token-env", auth_token_env]
    cmd += list(extra_args or [])
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=full_env, start_new_session=True, close_fds=True)
    _CHILDREN[proc.pid] = proc
    url = f"http://{url_host(host)}:{port}"
    handle = ServerHandle(proc.pid, port, host, url, str(log_path), str(state_file), model_name, instance)
    state = dict(asdict(handle), started_at=time.time(), command=cmd[1:], monitor=monitor, module=module)
    atomic_write_json(state_file, state)
    return handle


def server_env(parent: Mapping[str, str], keep: Iterable[str] = ()) -> dict[str, str]:
    """The part of `parent` (this process's environment) a model server may inherit.

    A server needs none of its starter's credentials, and whatever it loads (a model's
    code, a library) could read them, so every variable whose name looks like one is left
    out: GITHUB_TOKEN, GH_TOKEN, ACTIONS_RUNTIME_TOKEN, ACTIONS_ID_TOKEN_REQUEST_TOKEN and
    _URL, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, and any name containing TOKEN (but not
    TOKENIZER), SECRET, PASSWORD, PASSWD, CREDENTIAL, API_KEY/APIKEY or PRIVATE_KEY. `keep`
    names the ones it does need (the deployment's `auth_token_env`); the variables the
    starter sets itself (the instance token, `MONITOR_STORE_ENV`) are added afterwards.
    """
    kept = set(keep)
    return {k: v for k, v in parent.items() if k in kept or not _CREDENTIAL_NAME.search(k.upper())}


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
    body = _health(f"http://{url_host(host)}:{port}", timeout=2.0)
    if body is not None and _is_llmops(body):
        pid = body["pid"]
        if _alive(pid) and _is_our_server(pid):
            fix = f"stop it with `kill {pid}`"
        else:  # its pid is no server process here: it runs in a container (pid of its own namespace)
            fix = "find its container with `docker ps --filter label=llmops.managed` and remove it (`docker rm -f ID`)"
        raise ServeError(f"{where}: {describe_health(body)} still holds port {port}, perhaps orphaned after "
                         f".llmops/ was deleted: {fix}, or choose another serve.port.")
    what = "a program that is not an llmops server answers HTTP" if body is not None else "another program listens"
    raise ServeError(f"{where}: {what} on port {port}; find it with `ss -ltnp 'sport = :{port}'` and stop it, "
                     "or choose another serve.port.")


def _health(url: str, timeout: float = 5.0) -> dict[str, Any] | None:
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
    body = _health(url)
    return body is not None and body.get("status") == "ok" and body.get("instance") == instance


def other_server_at(url: str, instance: str | None = None) -> str | None:
    """Who answers `URL/health` if it is not the server started with `instance` (see
    `describe_health`); None when nothing answers there, or that server does."""
    body = _health(url, timeout=2.0)
    if body is None or (instance and body.get("instance") == instance):
        return None
    return describe_health(body)


def url_host(host: str) -> str:
    """HOST as the host part of a URL a client here can reach (a wildcard bind: loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


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


def _is_our_server(pid: int, module: str = SERVER_MODULE) -> bool:
    """Guard against pid reuse: the process's command line must be our server module."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (macOS): trust the state file
    return module.encode() in cmdline


def _log_tail(path: str | None, lines: int = 20) -> str:
    if not path:
        return ""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def get_json(url: str, timeout: float) -> dict[str, Any]:
    """GET URL and parse its JSON body (raises what urlopen and json.loads raise)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode("utf-8"))


def wait_healthy(url: str, timeout: float = 120.0, handle: ServerHandle | None = None) -> dict[str, Any]:
    """Poll `URL/health` until it answers 200; returns its JSON body.

    With `handle`, only that server counts: the answer must carry its instance token
    (anything else on the port is waited past), and a server process that exits while we
    wait fails at once, with the end of its log in the message (e.g. "Address already in use").
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
            body = get_json(url.rstrip("/") + "/health", timeout=5.0)
        except HTTP_ERRORS as exc:
            last = str(getattr(exc, "reason", exc)) or type(exc).__name__
        else:
            if handle is None or (isinstance(body, dict) and body.get("instance") == handle.instance):
                return body
            last = f"{describe_health(body if isinstance(body, dict) else {})} answers there, not ours"
        if time.monotonic() >= deadline:
            tail = f"; its log ends with:\n{_log_tail(handle.log_path)}" if handle else ""
            raise ServeError(f"{url}/health did not answer within {timeout:g}s (last error: {last}){tail}")
        time.sleep(0.2)


def server_status(state_file: Path | str, probe: bool = False) -> ServerStatus:
    """The server recorded in `state_file`: running or not (no state file: not running).

    With `probe`, also GET /health (`healthy`: True only when the recorded process runs and
    answers with the recorded instance token; None when not probed).
    """
    state = _read_state(state_file)
    if state is None:
        return ServerStatus(running=False)
    if "container" in state:  # started by the Docker runner
        from llmops.serve.container import container_status

        return container_status(state, probe=probe)
    pid = int(state["pid"])
    running = _alive(pid) and _is_our_server(pid, str(state.get("module") or SERVER_MODULE))
    healthy = (running and answers_as(str(state["url"]), state.get("instance"))) if probe else None
    return ServerStatus(running, pid, int(state["port"]), str(state["url"]), state.get("model_name"),
                        state.get("log_path"), healthy, state.get("instance"))


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
    was_running = _alive(pid) and _is_our_server(pid, str(state.get("module") or SERVER_MODULE))
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
