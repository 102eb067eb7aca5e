"""Picking the runner for a resource: `resources.runner` (or `serve.runner`), else `settings.runner`."""

from __future__ import annotations

from typing import Any

from llmops.errors import ProviderError
from llmops.runners.base import Runner


def runner_name(settings: dict[str, Any], spec: dict[str, Any]) -> str:
    """`local` or `docker`: the resource's own choice first, then the project's setting."""
    own = (spec.get("resources") or {}).get("runner") or (spec.get("serve") or {}).get("runner")
    return str(own or settings.get("runner") or "local")


def get_runner(settings: dict[str, Any], spec: dict[str, Any]) -> Runner:
    """The runner a resource with `spec` runs on under `settings`."""
    name = runner_name(settings, spec)
    if name == "local":
        from llmops.runners.local import LocalRunner

        return LocalRunner()
    if name == "docker":
        try:
            from llmops.runners.docker import DockerRunner
        except ImportError as exc:
            raise ProviderError(f"runner 'docker' is not available here ({exc}); use runner: local.") from exc
        return DockerRunner(docker_host=settings.get("docker_host"))
    raise ProviderError(f"runner '{name}' is unknown; use local or docker in settings.runner or resources.runner.")
