"""Serving control: start, stop and status of a deployment's model server, whichever kind.

The one place that knows where a deployment's server is recorded (`serve_state_file`;
with `serve.engine: vllm` also `vllm_state_file`, the container behind the proxy) and
which runner a state file belongs to. The deployments provider starts and stops servers
here (`start_deployment`, `down`), and so do `llmops rollback` (through it) and `llmops
down`. What only needs to know what runs (refresh, which also compares the server's
request-log settings with its monitor's; evals against a live endpoint) reads
`server_status`, `server_monitor` or `live_endpoint`, which start and stop nothing. No
monitor starts or stops a server.

Below this module: `llmops.serve.process` (a local process) and `llmops.serve.container`
(a container of the Docker runner) start and stop their own kind, and
`llmops.serve.endpoint` holds what both share (state file, ports, /health, pid check).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, cast

from llmops.errors import ProviderError
from llmops.serve.container import start_container_server, stop_container, wait_container_healthy
from llmops.serve.endpoint import (ServerStatus, free_port, is_container_state, other_server_at, read_state,
                                   server_monitor, server_status)
from llmops.serve.process import start_server, stop_process, wait_healthy

if TYPE_CHECKING:
    from llmops.providers.base import ProviderContext
    from llmops.runners.docker import DockerRunner
    from llmops.serve.vllm import VllmContainer

__all__ = ["ServerStatus", "down", "live_endpoint", "other_server_at", "serve_state_file", "server_monitor",
           "server_status", "start_deployment", "stop_server", "vllm_state_file"]


# -- state files and status (read-only) ------------------------------------------------
def serve_state_file(ctx: ProviderContext, name: str) -> Path:
    """The state file of deployment NAME's server (a built-in server's, or the vLLM proxy's)."""
    return ctx.state_dir / "serve" / f"{name}.json"


def vllm_state_file(ctx: ProviderContext, name: str) -> Path:
    """The vLLM container behind deployment NAME's proxy (`serve.engine: vllm`); the proxy's
    own state is `serve_state_file`, as a built-in server's is."""
    return ctx.state_dir / "serve" / f"{name}.vllm.json"


def live_endpoint(ctx: ProviderContext, name: str) -> str | None:
    """URL of deployment NAME's server when it is up and healthy now (the server it started,
    not merely something answering on its port), else None."""
    status = server_status(serve_state_file(ctx, name), probe=True)
    return status.url if status.running and status.healthy else None


# -- stop --------------------------------------------------------------------------------
def stop_server(state_file: Path | str, timeout: float = 15.0) -> bool:
    """Stop the server recorded in `state_file`, local process or container alike, and remove
    the state file. Returns whether a running server was stopped (no state file: False)."""
    state = read_state(state_file)
    if state is None:
        return False
    if is_container_state(state):  # started by the Docker runner
        return stop_container(state_file, state, timeout=timeout)
    return stop_process(state_file, state, timeout=timeout)


def down(ctx: ProviderContext, name: str) -> bool:
    """Stop deployment NAME's server (and a vLLM container behind it); True when one was running."""
    stopped = stop_server(serve_state_file(ctx, name))
    return stop_server(vllm_state_file(ctx, name)) or stopped


# -- start -------------------------------------------------------------------------------
def start_deployment(ctx: ProviderContext, name: str, spec: dict[str, Any], model_name: str, current: dict[str, Any],
                     served_file: Callable[[], Path]) -> dict[str, Any]:
    """(Re)start deployment NAME's server on `current`'s model; returns its outputs for the lock.
    A `monitors:` entry that watches it makes the server log requests to that monitor's
    store and take feedback.
    Without `serve.port`, a running server's port is kept so the endpoint stays put.
    With runner docker the server runs in `serve.image` (see `_serve_container`).
    `served_file` writes what is served (`--served-file`) and returns its path: called
    once the running server is stopped."""
    serve = spec["serve"]
    from llmops.monitor.spec import serving_monitor

    if not current.get("adapter") or not current.get("base_model"):
        raise ProviderError("the model's lock entry has no base model/adapter path to serve.")
    vllm = serve.get("engine") == "vllm"
    # checked before the running server is stopped
    runner = _vllm_runner(ctx, name, spec) if vllm else _docker_runner(ctx, name, spec)
    container = _vllm_container(ctx, name, serve, model_name, current) if vllm else None
    monitor = serving_monitor(ctx, name)
    if monitor is not None:  # the store it will log to: created, or refused, while the old server still runs
        from llmops.monitor.store import open_store

        open_store(monitor.store).close()
    port = int(serve.get("port", 0))
    if not port:
        running = server_status(serve_state_file(ctx, name))
        port = running.port if running.running and running.port else 0
    down(ctx, name)
    common: dict[str, Any] = dict(
        model_name=model_name, host=str(serve.get("host", "127.0.0.1")), port=port,
        auth_token_env=serve.get("auth_token_env"),
        request_log=None if monitor else ctx.state_dir / "serve" / f"{name}.requests.jsonl",
        monitor_store=monitor.store if monitor else None,
        log_text=bool(monitor and monitor.log_text),
        served_file=served_file(),
    )
    if container is not None:
        assert runner is not None
        return _serve_vllm(ctx, name, serve, runner, container, current, common)
    if runner is not None:
        return _serve_container(ctx, name, serve, runner, current, common)
    root = ctx.root
    handle = start_server(ctx.state_dir / "serve", name, root / current["base_model"],
                          adapter_dir=root / current["adapter"], **common)
    wait_healthy(handle.url, timeout=float(serve.get("startup_timeout", 180)), handle=handle)
    return {"endpoint": handle.url, "served_model": model_name}


def _docker_runner(ctx: ProviderContext, name: str, spec: dict[str, Any]) -> DockerRunner | None:
    """The Docker runner when deployment NAME serves with runner docker (else None), once
    `serve.image` is set and on the engine: a bad image leaves the running server alone."""
    from llmops.runners.docker import SERVE_DOCKERFILE
    from llmops.runners.select import get_runner, runner_name

    if runner_name(ctx.settings, {"serve": spec["serve"]}) != "docker":
        return None
    image = spec["serve"].get("image")
    if not image:
        raise ProviderError(f"llmops.yaml: deployments.{name}.serve.image is not set, and runner docker needs "
                            "it; set serve.image to an image with llmops installed (build one with `docker "
                            "build -f templates/Dockerfile.serve -t IMAGE .`) or use serve.runner: local.")
    runner = cast("DockerRunner", get_runner(ctx.settings, {"serve": spec["serve"]}, ctx.root))
    runner.image_digest(str(image), SERVE_DOCKERFILE)  # a missing image: says how to build or pull it
    return runner


def _serve_container(ctx: ProviderContext, name: str, serve: dict[str, Any], runner: DockerRunner,
                     current: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    """Start the server in `serve.image` with `serve.gpus` GPUs; the project folder is
    mounted at its own path, so the model paths are the same inside the container."""
    root = ctx.root.resolve()
    if common["request_log"] is not None:
        common["request_log"] = Path(common["request_log"]).resolve()
    server = start_container_server(
        ctx.state_dir / "serve", name, runner, str(serve["image"]), root / current["base_model"],
        workdir=root, adapter_dir=root / current["adapter"], gpus=int(serve.get("gpus", 0)), **common)
    wait_container_healthy(server, runner, timeout=float(serve.get("startup_timeout", 180)))
    return {"endpoint": server.url, "served_model": common["model_name"], "image_digest": server.image_digest}


def _vllm_runner(ctx: ProviderContext, name: str, spec: dict[str, Any]) -> DockerRunner:
    """The Docker runner `serve.engine: vllm` always runs on, once the vLLM image is on the
    engine (pulled: llmops never pulls it), so a missing image leaves the running server alone."""
    from llmops.runners.select import get_runner
    from llmops.serve.vllm import DEFAULT_IMAGE

    serve = spec["serve"]
    if serve.get("runner") == "local":
        raise ProviderError(f"llmops.yaml: deployments.{name}.serve.runner is local, but serve.engine: vllm "
                            "runs in a container; drop serve.runner (vLLM always uses the Docker runner).")
    runner = cast("DockerRunner", get_runner(ctx.settings, {"serve": {**serve, "runner": "docker"}},
                                             ctx.root))
    runner.image_digest(str(serve.get("image") or DEFAULT_IMAGE), "")  # missing: says `docker pull IMAGE`
    return runner


def _vllm_container(ctx: ProviderContext, name: str, serve: dict[str, Any], model_name: str,
                    current: dict[str, Any]) -> VllmContainer:
    """vLLM's container for `current`'s adapter, with a fresh random key (only the proxy
    gets it): built before the running server is stopped, so a bad setting leaves it alone."""
    import secrets

    from llmops.serve.vllm import check_extra_args, vllm_container

    root = ctx.root.resolve()
    return vllm_container(model_name=model_name, base_model=root / current["base_model"],
                          adapter=root / current["adapter"], gpus=int(serve.get("gpus", 0)),
                          api_key=secrets.token_urlsafe(24), image=serve.get("image"),
                          extra_args=check_extra_args(serve.get("vllm_args"), f"deployments.{name}.serve"))


def _serve_vllm(ctx: ProviderContext, name: str, serve: dict[str, Any], runner: DockerRunner, spec: VllmContainer,
                current: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    """Start vLLM's container (base model and adapter mounted read-only, `serve.gpus` GPUs,
    published on 127.0.0.1 only, a random key only the proxy holds), wait for its /health,
    then start the logging proxy (`llmops.serve.proxy`) on `serve.host:serve.port` in front
    of it. Either failing stops both: nothing is left half-started."""
    import time

    from llmops.fsutil import atomic_write_json
    from llmops.runners.docker import ServiceSpec
    from llmops.serve.proxy import UPSTREAM_KEY_ENV
    from llmops.serve.vllm import API_KEY_ENV, wait_vllm_healthy

    root = ctx.root.resolve()
    key = spec.env[API_KEY_ENV]
    timeout = float(serve.get("startup_timeout", 180))
    port = free_port()
    service = ServiceSpec(name=f"vllm-{name}", image=spec.image, command=spec.command, port=port,
                          container_port=spec.container_port, entrypoint=spec.entrypoint, mounts=spec.mounts,
                          env=spec.env, gpus=spec.gpus, healthcheck=spec.healthcheck, health_start_s=timeout,
                          health_interval_s=spec.health_interval_s, shm_size=spec.shm_size)
    container, digest = runner.run_service(service)
    state_dir = ctx.state_dir / "serve"
    upstream = f"http://127.0.0.1:{port}"
    state_file = vllm_state_file(ctx, name)
    atomic_write_json(state_file, {
        "container": container, "url": upstream, "port": port, "host": "127.0.0.1",
        "image": spec.image, "image_digest": digest, "model_name": common["model_name"],
        "log_path": str(state_dir / f"{name}.vllm.log"), "instance": None,
        "docker_host": runner.docker_host or os.environ.get("DOCKER_HOST") or None,
        "engine": "vllm", "gpus": spec.gpus, "command": [*spec.entrypoint, *spec.command],
        "started_at": time.time()})
    try:
        wait_vllm_healthy(runner, container, upstream, timeout)
        handle = start_server(state_dir, name, root / current["base_model"], adapter_dir=root / current["adapter"],
                              module="llmops.serve.proxy", extra_args=["--upstream", upstream],
                              env={UPSTREAM_KEY_ENV: key}, **common)
        wait_healthy(handle.url, timeout=60.0, handle=handle)
    except BaseException:
        stop_server(serve_state_file(ctx, name))
        stop_server(state_file)
        raise
    return {"endpoint": handle.url, "served_model": common["model_name"], "engine": "vllm", "image": spec.image,
            "image_digest": digest}
