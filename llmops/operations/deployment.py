"""Imperative operations outside plan/apply: roll a deployment back, stop its server.

Each one holds the apply lock while it changes state and records the result in llmops.lock.
"""

from __future__ import annotations

from dataclasses import replace

from llmops.engine.applylock import ApplyLock
from llmops.errors import LlmopsError
from llmops.engine.lockfile import LockedResource, save_lock
from llmops.engine.project import Project


def _deployment(project: Project, address: str) -> tuple[str, LockedResource]:
    kind, _, name = address.partition(".")
    if not name:
        kind, name = "deployments", address
    if kind != "deployments":
        raise LlmopsError(f"'{address}' is not a deployment; use deployments.NAME.")
    entry = project.lock.get(f"deployments.{name}")
    if entry is None:
        raise LlmopsError(f"deployments.{name} is not in llmops.lock; apply it first.")
    return name, entry


def rollback_deployment(project: Project, address: str, lock_timeout: float = 0.0) -> LockedResource:
    """Point the deployment's alias at its previous version, serve that, record it."""
    from llmops.providers.deployments import rollback

    _deployment(project, address)  # a bad address fails before waiting for the lock
    with ApplyLock.for_project(project, command="rollback", timeout=lock_timeout):
        project.reload_lock()  # an apply may have finished while this waited: save on top of its lock
        name, entry = _deployment(project, address)
        outputs = rollback(project.context(), name, entry)
        new = replace(entry, outputs=outputs)
        project.lock.set(new)
        save_lock(project.lock, project.lock_path)
    return new


def stop_deployment(project: Project, address: str, lock_timeout: float = 0.0) -> bool:
    """Stop the deployment's server (the alias stays); True when one was running."""
    from llmops.serve.control import down

    _deployment(project, address)
    with ApplyLock.for_project(project, command="down", timeout=lock_timeout):
        project.reload_lock()
        name, entry = _deployment(project, address)
        stopped = down(project.context(), name)
        if "endpoint" in entry.outputs:
            outputs = {k: v for k, v in entry.outputs.items()
                       if k not in ("endpoint", "served_model", "image_digest")}
            project.lock.set(replace(entry, outputs=outputs))
            save_lock(project.lock, project.lock_path)
    return stopped
