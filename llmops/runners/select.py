"""Picking the runner for a resource: `resources.runner` (or `serve.runner`), else `settings.runner`.

Also reads `settings.docker` (interpreter inside the image, extra bind mounts) into the
Docker runner's arguments. Nothing heavy is imported here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmops.errors import ProviderError
from llmops.runners.base import Runner

MOUNT_MODES = ("ro", "rw")


def runner_name(settings: dict[str, Any], spec: dict[str, Any]) -> str:
    """`local` or `docker`: the resource's own choice first, then the project's setting."""
    own = (spec.get("resources") or {}).get("runner") or (spec.get("serve") or {}).get("runner")
    return str(own or settings.get("runner") or "local")


def get_runner(settings: dict[str, Any], spec: dict[str, Any], root: Path | None = None) -> Runner:
    """The runner a resource with `spec` runs on under `settings`.

    `root` is the project folder: relative host paths in `settings.docker.mounts` are
    relative to it (to the working directory when it is None).
    """
    name = runner_name(settings, spec)
    if name == "local":
        from llmops.runners.local import LocalRunner

        return LocalRunner()
    if name == "docker":
        try:
            from llmops.runners.docker import DockerRunner
        except ImportError as exc:
            raise ProviderError(f"runner 'docker' is not available here ({exc}); use runner: local.") from exc
        docker = settings.get("docker") or {}
        return DockerRunner(
            docker_host=settings.get("docker_host"),
            python=str(docker.get("python") or "python"),
            extra_mounts=[parse_mount(m, i, root) for i, m in enumerate(docker.get("mounts") or [])],
        )
    raise ProviderError(f"runner '{name}' is unknown; use local or docker in settings.runner or resources.runner.")


def parse_mount(text: Any, index: int, root: Path | None = None) -> tuple[str, str, str]:
    """`HOST:CONTAINER[:ro|rw]` as `(absolute host path, container path, mode)`; mode defaults to rw.

    A relative (or `~`) host path is made absolute against `root` (the project folder).
    """
    where = f"settings.docker.mounts[{index}]"
    fix = "write it as HOST:CONTAINER or HOST:CONTAINER:ro (e.g. ~/.cache/huggingface:/hf-cache:ro)."
    if not isinstance(text, str) or not text:
        raise ProviderError(f"llmops.yaml: {where} is {text!r}, not a mount; {fix}")
    parts = text.split(":")
    if len(parts) == 3 and parts[2] in MOUNT_MODES:
        host, container, mode = parts
    elif len(parts) == 2:
        (host, container), mode = parts, "rw"
    else:
        raise ProviderError(f"llmops.yaml: {where} '{text}' is not HOST:CONTAINER[:ro|rw]; {fix}")
    if not host or not container.startswith("/"):
        raise ProviderError(
            f"llmops.yaml: {where} '{text}' needs a host path and an absolute container path; {fix}"
        )
    host_path = Path(os.path.expanduser(host))
    if not host_path.is_absolute():
        host_path = (root or Path.cwd()) / host_path
    return str(host_path.resolve()), container, mode
