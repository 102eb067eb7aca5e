"""The model server in a container: start it with the Docker runner, wait until healthy, status, stop.

`start_container_server` runs the same `python -m llmops.serve` as the local runner, in
`image`, through `DockerRunner.run_detached`: the project folder is bind-mounted at the same
path (so model, adapter, request-log and SQLite store paths mean the same inside), the
server listens on every interface inside the container, and the engine publishes that port
on `host:port`. GPUs reach it as a device request. A bearer token travels as the value of
the environment variable `auth_token_env` names (read here, from this process's
environment), and a store URL with a password as `LLMOPS_MONITOR_STORE`: neither appears
in the command, the state file, the lock or a log. Nothing else of this process's
environment reaches the container (so none of its credentials, see `process.server_env`),
only the random instance token /health repeats: as for a local server, the container
counts as healthy only while it runs and answers with that token, and a fixed port that
something else holds fails before the container starts.

The state file (`state_dir/NAME.json`, the same place as a local server's) carries a
`container` key with the container id and the engine address; `llmops.serve.endpoint`
reads its status and `llmops.serve.control` hands it to `stop_container` here, so status,
refresh, `llmops down` and monitors treat both kinds of server alike.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops.errors import ProviderError
from llmops.runners.base import Job
from llmops.serve.endpoint import (HTTP_ERRORS, SERVER_MODULE, ServeError, check_port, describe_health, free_port,
                                   get_json, server_args, server_status, url_host)
from llmops.serve.server import INSTANCE_ENV

if TYPE_CHECKING:
    from llmops.runners.docker import DockerRunner

SAVED_LOG_LINES = 200  # the container's last lines kept in NAME.log when it is removed


@dataclass(frozen=True)
class ContainerServer:
    """A started server container: `url` is its base as seen from here (`http://host:port`)."""

    container: str
    port: int
    host: str
    url: str
    image: str
    image_digest: str
    model_name: str
    state_file: str
    log_path: str
    docker_host: str | None
    instance: str  # the token its /health answers with


def start_container_server(
    state_dir: Path | str,
    name: str,
    runner: DockerRunner,
    image: str,
    model_dir: Path | str,
    *,
    workdir: Path | str,
    model_name: str,
    adapter_dir: Path | str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    gpus: int = 0,
    auth_token_env: str | None = None,
    request_log: Path | str | None = None,
    monitor_store: str | None = None,
    log_text: bool = False,
    served_file: Path | str | None = None,
) -> ContainerServer:
    """Start the server container; state in `state_dir/NAME.json`. Port 0 picks a free port.

    Returns at once: call `wait_container_healthy` before sending requests. Refuses to
    start while a server (of either kind) recorded under NAME still runs, or when a fixed
    port is taken.
    """
    from llmops.fsutil import atomic_write_json

    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file = state_dir / f"{name}.json"
    current = server_status(state_file)
    if current.running:
        raise ServeError(f"server '{name}' already runs ({current.url}); stop it first ({state_file})")
    if port:
        check_port(host, port, name)
    instance = secrets.token_urlsafe(16)
    env: dict[str, str] = {INSTANCE_ENV: instance}
    args, monitor = server_args(model_dir, adapter_dir, model_name, request_log, monitor_store, log_text, env,
                                served_file)
    if auth_token_env:
        token = os.environ.get(auth_token_env, "")
        if not token:
            raise ProviderError(f"serve.auth_token_env names {auth_token_env}, but that environment variable is "
                                "empty or not set here; set it (the container gets its value) or drop auth_token_env.")
        env[auth_token_env] = token
        args += ["--auth-token-env", auth_token_env]
    port = port or free_port(host)
    args += ["--host", "0.0.0.0", "--port", str(port)]  # inside: every interface; the engine publishes host:port
    from llmops.runners.docker import SERVE_DOCKERFILE

    digest = runner.image_digest(image, SERVE_DOCKERFILE)  # an image the engine lacks: say so before starting
    job = Job(name=f"serve-{name}", module=SERVER_MODULE, args=args, workdir=Path(workdir),
              log_path=state_dir / f"{name}.log", env=env, gpus=int(gpus), image=image)
    container = runner.run_detached(job, port=port, container_port=port, host=host)
    docker_host = runner.docker_host or os.environ.get("DOCKER_HOST") or None
    server = ContainerServer(container, port, host, f"http://{url_host(host)}:{port}", image, digest, model_name,
                             str(state_file), str(job.log_path), docker_host, instance)
    atomic_write_json(state_file, dict(asdict(server), started_at=time.time(), gpus=int(gpus),
                                      command=[SERVER_MODULE, *args], monitor=monitor))
    return server


def _runner(state: dict[str, Any]) -> DockerRunner:
    from llmops.runners.docker import DockerRunner

    return DockerRunner(docker_host=state.get("docker_host"))


def wait_container_healthy(server: ContainerServer, runner: DockerRunner, timeout: float = 180.0) -> dict[str, Any]:
    """Poll `URL/health` until this container's server answers (with its instance token:
    anything else on the port is waited past); returns its JSON body.

    A container that exits while we wait, or a server that does not answer in `timeout`
    seconds, fails with the container's last output in the message; the container is
    removed and the state file deleted, so nothing is left half-started.
    """
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        if not runner.is_running(server.container):
            problem = f"the model server container {server.container[:12]} (image {server.image}) exited while starting"
            break
        try:
            body = get_json(server.url + "/health", timeout=5.0)
        except HTTP_ERRORS as exc:
            last = str(getattr(exc, "reason", exc)) or type(exc).__name__
        else:
            if isinstance(body, dict) and body.get("instance") == server.instance:
                return body
            last = f"{describe_health(body if isinstance(body, dict) else {})} answers there, not this container"
        if time.monotonic() >= deadline:
            problem = f"{server.url}/health did not answer within {timeout:g}s (last error: {last})"
            break
        time.sleep(0.3)
    output = runner.logs(server.container).rstrip()
    stop_container(server.state_file, runner=runner)
    raise ServeError(f"{problem}; its output ends with:\n{output or '(no output)'}")


def stop_container(state_file: Path | str, state: dict[str, Any] | None = None, timeout: float = 15.0,
                   runner: DockerRunner | None = None) -> bool:
    """Stop and remove the container recorded in `state_file` (its last output is kept in its
    log file) and delete the state file. Returns whether it was running. An engine that does
    not answer is an error, and the state stays, so a later `llmops down` can try again."""
    state = state if state is not None else json.loads(Path(state_file).read_text(encoding="utf-8"))
    runner = runner or _runner(state)
    container = str(state["container"])
    was_running = runner.is_running(container)
    output = runner.logs(container, tail=SAVED_LOG_LINES)
    runner.stop(container, timeout=max(1, int(timeout)))
    if output and state.get("log_path"):
        try:
            Path(state["log_path"]).write_text(output, encoding="utf-8")
        except OSError:
            pass  # the log is a courtesy; the container is gone either way
    Path(state_file).unlink(missing_ok=True)
    return was_running
