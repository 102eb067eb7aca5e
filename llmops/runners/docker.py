"""The Docker runner: training jobs and servers in containers on a local or remote engine.

A job runs as `PYTHON -m MODULE ARGS...` in `job.image`, with the project folder
bind-mounted at the same path and used as the working directory, so paths the
providers hand over mean the same inside and outside the container. With a remote
`DOCKER_HOST` the bind mounts name folders on the *engine's* machine: the project must
be there at the same path (a shared file system, or a CI runner that is the engine host).

The `docker` SDK is imported only inside the functions that use it.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

from llmops.errors import ProviderError
from llmops.runners.base import Job, JobResult, Runner

LOG_TAIL_LINES = 40
MANAGED_LABEL = "llmops.managed"
JOB_LABEL = "llmops.job"
BUILD_HINT = "docker build -f {dockerfile} -t {image} ."
TRAIN_DOCKERFILE = "templates/Dockerfile.train"
SERVE_DOCKERFILE = "templates/Dockerfile.serve"


def describe_host(docker_host: str | None) -> str:
    """The engine address as people should read it in a message."""
    if docker_host:
        return f"DOCKER_HOST={docker_host}"
    if os.environ.get("DOCKER_HOST"):
        return f"DOCKER_HOST={os.environ['DOCKER_HOST']}"
    return "DOCKER_HOST unset (default unix:///var/run/docker.sock)"


def container_name(job_name: str) -> str:
    """A unique, Docker-legal container name that still says which job it is."""
    slug = re.sub(r"[^a-zA-Z0-9_.-]+", "-", job_name).strip("-.") or "job"
    return f"llmops-{slug[:60]}-{uuid.uuid4().hex[:8]}"


def build_create_kwargs(
    job: Job,
    *,
    python: str = "python",
    user: str | None = None,
    extra_mounts: list[tuple[str, str, str]] | None = None,
) -> dict[str, Any]:
    """The keyword arguments for `client.containers.create` that run `job`.

    Pure: talks to no engine, so the GPU request can be checked where no GPU exists.
    """
    from docker.types import DeviceRequest, Mount

    if not job.image:
        raise ProviderError(
            f"job {job.name} has no container image; set resources.image (or serve.image) "
            "to run it with the Docker runner, or use runner: local."
        )
    workdir = str(Path(job.workdir).resolve())
    mounts = [Mount(target=workdir, source=workdir, type="bind", read_only=False)]
    for host_path, container_path, mode in extra_mounts or []:
        if mode not in ("ro", "rw"):
            raise ProviderError(f"extra mount {host_path}:{container_path} has mode {mode!r}; use 'ro' or 'rw'.")
        mounts.append(Mount(target=container_path, source=host_path, type="bind", read_only=mode == "ro"))
    env = {
        # Python inside the container must not hold lines back: on_line is live progress.
        "PYTHONUNBUFFERED": "1",
        # An arbitrary uid has no passwd entry and so no home; libraries cache under $HOME.
        "HOME": "/tmp",
    }
    env.update(job.env)
    kwargs: dict[str, Any] = {
        "image": job.image,
        "entrypoint": [python, "-m", job.module],
        "command": [str(a) for a in job.args],
        "working_dir": workdir,
        "environment": env,
        "mounts": mounts,
        "name": container_name(job.name),
        "labels": {MANAGED_LABEL: "true", JOB_LABEL: job.name},
        "user": user if user is not None else f"{os.getuid()}:{os.getgid()}",
        # Python turns SIGINT into KeyboardInterrupt even as PID 1, where SIGTERM's default
        # action is ignored; so `stop` ends a job at once instead of waiting for SIGKILL.
        "stop_signal": "SIGINT",
        "tty": False,
    }
    if job.gpus > 0:
        kwargs["device_requests"] = [DeviceRequest(count=job.gpus, capabilities=[["gpu"]])]
    return kwargs


@dataclass(frozen=True)
class ServiceSpec:
    """A long-running container that is not a `python -m` job, such as vLLM's server: its
    own entrypoint and arguments, bind mounts `(host, container, "ro"|"rw")` and nothing else
    of the host (no project folder, no environment but `env`), `container_port` published on
    `host:port`, GPUs as a device request, and a Docker healthcheck (`healthcheck` is its test,
    e.g. `["CMD", "python3", "-c", "..."]`; `health_start_s` the grace before failures count).
    `user` None keeps the image's own user (vLLM's image runs as root)."""

    name: str
    image: str
    command: list[str]
    port: int
    container_port: int
    entrypoint: list[str] | None = None
    mounts: list[tuple[str, str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    gpus: int = 0
    host: str = "127.0.0.1"
    healthcheck: list[str] = field(default_factory=list)
    health_interval_s: float = 10.0
    health_start_s: float = 180.0
    shm_size: str | None = None
    user: str | None = None


def build_service_kwargs(spec: ServiceSpec) -> dict[str, Any]:
    """The keyword arguments for `client.containers.create` that run `spec`.

    Pure: talks to no engine, so the GPU request, mounts, port and healthcheck can be checked
    where neither the image nor a GPU exists.
    """
    from docker.types import DeviceRequest, Healthcheck, Mount

    mounts = []
    for host_path, container_path, mode in spec.mounts:
        if mode not in ("ro", "rw"):
            raise ProviderError(f"mount {host_path}:{container_path} has mode {mode!r}; use 'ro' or 'rw'.")
        mounts.append(Mount(target=container_path, source=str(host_path), type="bind", read_only=mode == "ro"))
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "command": [str(a) for a in spec.command],
        "environment": dict(spec.env),
        "mounts": mounts,
        "name": container_name(spec.name),
        "labels": {MANAGED_LABEL: "true", JOB_LABEL: spec.name},
        "ports": {f"{spec.container_port}/tcp": (spec.host, spec.port)},
        "tty": False,
    }
    if spec.entrypoint is not None:
        kwargs["entrypoint"] = list(spec.entrypoint)
    if spec.user is not None:
        kwargs["user"] = spec.user
    if spec.shm_size:
        kwargs["shm_size"] = spec.shm_size
    if spec.healthcheck:
        ns = 1_000_000_000
        kwargs["healthcheck"] = Healthcheck(test=list(spec.healthcheck), interval=int(spec.health_interval_s * ns),
                                            timeout=int(5 * ns), retries=3, start_period=int(spec.health_start_s * ns))
    if spec.gpus > 0:
        kwargs["device_requests"] = [DeviceRequest(count=spec.gpus, capabilities=[["gpu"]])]
    return kwargs


class DockerRunner(Runner):
    """Runs jobs in containers on the engine at `docker_host` (default: `$DOCKER_HOST`).

    `python` is the interpreter inside the image; `extra_mounts` are `(host, container,
    mode)` bind mounts added to every container; `user` defaults to the caller's
    `uid:gid` so files written into the project belong to the user. Containers are
    always removed when `run` returns, whether the job succeeded, failed or was cancelled.
    """

    def __init__(
        self,
        docker_host: str | None = None,
        python: str = "python",
        extra_mounts: list[tuple[str, str, str]] | None = None,
        user: str | None = None,
        stop_timeout: int = 10,
    ) -> None:
        self.docker_host = docker_host
        self.python = python
        self.extra_mounts = list(extra_mounts or [])
        self.user = user
        self.stop_timeout = stop_timeout
        self._client: Any = None

    # -- engine -----------------------------------------------------------------------

    def client(self) -> Any:
        """A connected `docker.DockerClient`; a clear error when the engine does not answer."""
        if self._client is not None:
            return self._client
        import docker

        try:
            if self.docker_host:
                client = docker.DockerClient(base_url=self.docker_host)
            else:
                client = docker.from_env()
            client.ping()
        except docker.errors.DockerException as exc:
            raise ProviderError(
                f"cannot reach the Docker engine ({describe_host(self.docker_host)}): {exc}. "
                "Start the engine, or point DOCKER_HOST (settings.docker_host) at one that runs."
            ) from exc
        self._client = client
        return client

    def image_digest(self, image: str, dockerfile: str = TRAIN_DOCKERFILE) -> str:
        """The image's repo digest (`name@sha256:...`) when pushed, else its id (`sha256:...`).

        A missing image's error says to build it from `dockerfile` (or pull it; only that with
        no `dockerfile`)."""
        import docker

        try:
            found = self.client().images.get(image)
        except docker.errors.ImageNotFound as exc:
            build = f"build it with `{BUILD_HINT.format(dockerfile=dockerfile, image=image)}` or " if dockerfile else ""
            raise ProviderError(
                f"image {image} is not on the Docker engine ({describe_host(self.docker_host)}); "
                f"{build}pull it with `docker pull {image}`."
            ) from exc
        repo_digests = found.attrs.get("RepoDigests") or []
        return sorted(repo_digests)[0] if repo_digests else found.id

    def _start(self, job: Job, ports: dict[str, tuple[str, int]] | None = None) -> tuple[Any, str]:
        """Create and start the job's container, returning it and its image's digest.

        On any failure nothing is left behind on the engine.
        """
        kwargs = build_create_kwargs(job, python=self.python, user=self.user, extra_mounts=self.extra_mounts)
        if ports:
            kwargs["ports"] = ports
        digest = self.image_digest(kwargs["image"])
        return self._create_and_start(kwargs, job.name, job.gpus), digest

    def _create_and_start(self, kwargs: dict[str, Any], name: str, gpus: int) -> Any:
        """Create and start a container from `kwargs`; on any failure nothing is left behind."""
        import docker

        try:
            container = self.client().containers.create(**kwargs)
        except docker.errors.APIError as exc:  # e.g. a bind-mount source the engine lacks
            raise self._start_error(name, str(kwargs["image"]), gpus, exc) from exc
        try:
            container.start()
        except docker.errors.APIError as exc:
            _remove(container)
            raise self._start_error(name, str(kwargs["image"]), gpus, exc) from exc
        except BaseException:
            _remove(container)
            raise
        return container

    def _start_error(self, name: str, image: str, gpus: int, exc: Exception) -> ProviderError:
        text = str(getattr(exc, "explanation", None) or exc)
        if gpus > 0 and ("device driver" in text or "nvidia" in text.lower()):
            return ProviderError(
                f"this Docker engine has no GPU support: {text} ({describe_host(self.docker_host)}). "
                f"Job {name} asks for {gpus} GPU(s); install the NVIDIA Container Toolkit on "
                "the engine's host, point DOCKER_HOST at an engine with GPUs, or set resources.gpus: 0 "
                "(serve.gpus: 0 for a built-in server; serve.engine: vllm needs a GPU)."
            )
        return ProviderError(
            f"the Docker engine ({describe_host(self.docker_host)}) could not start job {name} "
            f"in image {image}: {text}"
        )

    # -- jobs -------------------------------------------------------------------------

    def run(
        self,
        job: Job,
        on_line: Callable[[str], None] = lambda line: None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> JobResult:
        """Run the job to completion (or stop it when `cancelled()` turns true).

        Every output line goes to `job.log_path` and `on_line` as it arrives. The engine
        copies stdout and stderr separately, so lines keep their order within a stream
        but not always across the two. The exit code is returned, not raised on: a
        cancelled job ends with a non-zero code.
        """
        container, digest = self._start(job)
        tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        try:
            Path(job.log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(job.log_path, "w", encoding="utf-8") as log:
                self._follow(container, log, tail, on_line, cancelled)
            exit_code = int(container.wait(timeout=max(60, self.stop_timeout + 30))["StatusCode"])
        finally:
            _remove(container)
        return JobResult(exit_code=exit_code, log_tail="\n".join(tail), image_digest=digest)

    def _follow(
        self,
        container: Any,
        log: IO[str],
        tail: deque[str],
        on_line: Callable[[str], None],
        cancelled: Callable[[], bool],
    ) -> None:
        """Copy the container's output line by line until it exits; stop it on cancel."""
        chunks: queue.Queue[bytes | BaseException | None] = queue.Queue()
        reader = threading.Thread(target=_read_logs, args=(container, chunks), daemon=True)
        reader.start()
        pending = b""
        stopping = False

        def emit(raw: bytes) -> None:
            line = raw.decode("utf-8", errors="replace").rstrip("\r")
            log.write(line + "\n")
            log.flush()
            tail.append(line)
            on_line(line)

        while True:
            if not stopping and cancelled():
                stopping = True
                # Stopping in its own thread keeps the output flowing while the job shuts down.
                threading.Thread(target=_stop, args=(container, self.stop_timeout), daemon=True).start()
            try:
                item = chunks.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is None:
                break
            if isinstance(item, BaseException):
                raise ProviderError(f"lost the output of container {container.short_id}: {item}") from item
            pending += item
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                emit(raw)
        if pending:
            emit(pending)

    # -- servers ----------------------------------------------------------------------

    def run_detached(self, job: Job, *, port: int, container_port: int | None = None, host: str = "127.0.0.1") -> str:
        """Start a long-running container (a model server) and return its id.

        The container listens on `container_port` (default: `port`); the engine publishes
        it on `host:port`. Call `stop(id)` to end it; `logs(id)` shows its output.
        """
        container, _ = self._start(job, ports={f"{container_port or port}/tcp": (host, port)})
        return str(container.id)

    def run_service(self, spec: ServiceSpec, dockerfile: str | None = None) -> tuple[str, str]:
        """Start `spec`'s container detached; returns its id and its image's digest. A missing
        image fails first, saying how to pull it (or build it from `dockerfile`)."""
        digest = self.image_digest(spec.image, dockerfile or "")  # before anything is created
        container = self._create_and_start(build_service_kwargs(spec), spec.name, spec.gpus)
        return str(container.id), digest

    def health(self, container_id: str) -> str | None:
        """Docker's healthcheck status of a container (`starting`, `healthy`, `unhealthy`);
        None when it has no healthcheck or no longer exists."""
        import docker

        try:
            container = self.client().containers.get(container_id)
        except docker.errors.NotFound:
            return None
        state = container.attrs.get("State") or {}
        return (state.get("Health") or {}).get("Status")

    def is_running(self, container_id: str) -> bool:
        """Whether the container exists and is running (a crashed server reads False)."""
        import docker

        try:
            container = self.client().containers.get(container_id)
        except docker.errors.NotFound:
            return False
        return container.status == "running"

    def logs(self, container_id: str, tail: int = LOG_TAIL_LINES) -> str:
        """The last `tail` lines a detached container wrote (stdout and stderr)."""
        import docker

        try:
            container = self.client().containers.get(container_id)
        except docker.errors.NotFound:
            return ""
        return container.logs(tail=tail).decode("utf-8", errors="replace")

    def stop(self, container_id: str, timeout: int | None = None) -> None:
        """Stop and remove a container; a container already gone is not an error."""
        import docker

        try:
            container = self.client().containers.get(container_id)
        except docker.errors.NotFound:
            return
        _stop(container, self.stop_timeout if timeout is None else timeout)
        _remove(container)


def _read_logs(container: Any, chunks: queue.Queue) -> None:
    """Thread body: push output chunks, then an error if the stream broke, then None."""
    try:
        for chunk in container.logs(stdout=True, stderr=True, stream=True, follow=True):
            chunks.put(chunk)
    except Exception as exc:  # the engine went away mid-stream: the caller reports it
        chunks.put(exc)
    finally:
        chunks.put(None)


def _stop(container: Any, timeout: int) -> None:
    import docker

    try:
        container.stop(timeout=timeout)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError:
        # Stop failed (engine busy, container already exiting): force removal kills it.
        _remove(container)


def _remove(container: Any) -> None:
    import docker

    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        # "removal already in progress" is fine: another path is removing it.
        if "already in progress" not in str(exc):
            raise
