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
texts are logged (`server_monitor`), so refresh can tell when the server must restart.
A store URL with a password reaches the server through an environment variable, never
its command line (which the state file and `ps` show).

The ports, the /health probe, the state file and the pid check are shared with the
Docker runner (`llmops.serve.endpoint`); `llmops.serve.control` picks this module or
`llmops.serve.container` by the state file's kind.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from llmops.fsutil import atomic_write_json
from llmops.serve.endpoint import (HTTP_ERRORS, SERVER_MODULE, ServeError, check_port, describe_health, free_port,
                                   get_json, is_our_server, log_tail, pid_alive, server_args, server_status, url_host)
from llmops.serve.server import INSTANCE_ENV

_CHILDREN: dict[int, subprocess.Popen] = {}  # keeps Popen objects alive: no ResourceWarning, reapable
# Names of variables that hold credentials (TOKENIZERS_PARALLELISM is a setting, not a token).
_CREDENTIAL_NAME = re.compile(r"TOKEN(?!IZER)|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|PRIVATE_?KEY")


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
    current = server_status(state_file)  # a container recorded under NAME counts too
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


def _reap(pid: int) -> None:
    """Collect our own child `pid` once it has exited, so it leaves no zombie behind."""
    proc = _CHILDREN.get(pid)
    if proc is not None and proc.poll() is not None:
        _CHILDREN.pop(pid, None)


def _live(pid: int) -> bool:
    _reap(pid)
    return pid_alive(pid)


def running(pid: int, module: str = SERVER_MODULE) -> bool:
    """Whether `pid` is a live process running our server `module` (not a reused pid)."""
    return _live(pid) and is_our_server(pid, module)


def wait_healthy(url: str, timeout: float = 120.0, handle: ServerHandle | None = None) -> dict[str, Any]:
    """Poll `URL/health` until it answers 200; returns its JSON body.

    With `handle`, only that server counts: the answer must carry its instance token
    (anything else on the port is waited past), and a server process that exits while we
    wait fails at once, with the end of its log in the message (e.g. "Address already in use").
    """
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        if handle is not None and not _live(handle.pid):
            raise ServeError(
                f"the model server (pid {handle.pid}) exited while starting; its log {handle.log_path} ends with:\n"
                f"{log_tail(handle.log_path)}"
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
            tail = f"; its log ends with:\n{log_tail(handle.log_path)}" if handle else ""
            raise ServeError(f"{url}/health did not answer within {timeout:g}s (last error: {last}){tail}")
        time.sleep(0.2)


def stop_process(state_file: Path | str, state: dict[str, Any], timeout: float = 15.0) -> bool:
    """Stop the server process `state` (read from `state_file`) records: SIGTERM to its process
    group, SIGKILL after `timeout`; then remove the state file. Returns whether it was running."""
    pid = int(state["pid"])
    was_running = running(pid, str(state.get("module") or SERVER_MODULE))
    if was_running:
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _live(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _live(pid):
            _signal_group(pid, signal.SIGKILL)
            while _live(pid) and time.monotonic() < deadline + 5:
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
