"""apply_plan: run a plan's changes in dependency order, recording each success in the lock.

Independent resources run in parallel (threads; the heavy work happens in subprocesses or
native code). Only the calling thread touches the lock: each success is written
atomically as soon as it is known, so an interrupted apply resumes where it stopped.
A failure skips everything downstream of it; by default nothing new starts after it.
Ctrl-C stops launching work, asks running work to stop, and keeps the lock consistent.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from llmops.errors import LlmopsError, ProviderError
from llmops.lockfile import LockedResource, save_lock
from llmops.plan import Plan, ResourceChange
from llmops.project import Project
from llmops.providers.base import ApplyRequest, ApplyResult, ProgressEvent


class ApplyHooks:
    """Callbacks through which apply reports (Terraform's Hook). Default: silent."""

    def pre_apply(self, change: ResourceChange) -> None: ...

    def post_apply(self, change: ResourceChange, error: BaseException | None) -> None: ...

    def recorded(self, change: ResourceChange, outputs: dict) -> None:
        """A success was written to the lock with these outputs (for a one-line summary)."""

    def progress(self, address: str, event: ProgressEvent) -> None: ...

    def log(self, address: str, message: str) -> None: ...

    def skipped(self, address: str, reason: str) -> None: ...


@dataclass
class ApplyReport:
    applied: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted and not self.skipped


def apply_plan(
    project: Project,
    plan: Plan,
    hooks: ApplyHooks | None = None,
    parallelism: int | None = None,
    keep_going: bool = False,
) -> ApplyReport:
    hooks = hooks or ApplyHooks()
    project.log = hooks.log
    parallelism = max(1, int(parallelism or project.config.settings.get("parallelism") or 1))
    report = ApplyReport()
    cancel = threading.Event()
    work = [c for c in plan.changes if c.action != "no-op"]
    for kind in sorted({c.kind for c in work if not c.lock_only}):
        provider = project.provider(kind)
        if provider is not None:
            provider.warm_up()

    try:
        for change in [c for c in work if c.action == "delete"]:
            if cancel.is_set() or (report.failed and not keep_going):
                report.skipped[change.address] = "apply stopped before it started"
                continue
            _run_one(project, change, hooks, report, lambda: _delete(project, change))
        _run_graph(project, [c for c in work if c.action != "delete"], hooks, report,
                   parallelism, keep_going, cancel)
    except KeyboardInterrupt:
        report.interrupted = True
    return report


def _run_one(project: Project, change: ResourceChange, hooks: ApplyHooks, report: ApplyReport, fn) -> None:
    hooks.pre_apply(change)
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none escapes
        report.failed[change.address] = _message(exc)
        hooks.post_apply(change, exc)
        return
    report.applied.append(change.address)
    hooks.post_apply(change, None)


def _message(exc: BaseException) -> str:
    if isinstance(exc, LlmopsError):
        return exc.message
    # An unexpected error is a bug: say where it happened so it can be reported.
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"unexpected {type(exc).__name__}: {exc}{where}; please report it with the apply log."


def _delete(project: Project, change: ResourceChange) -> None:
    locked = project.lock.get(change.address)
    provider = project.provider(change.kind)
    if provider is None:
        raise ProviderError(_no_provider(change.kind, change.address))
    if locked is not None:
        provider.delete(change.name, locked)
    project.lock.remove(change.address)
    save_lock(project.lock, project.lock_path)


def _no_provider(kind: str, address: str) -> str:
    return (f"{address}: llmops cannot apply `{kind}` resources yet (no provider for this kind in "
            f"this version). `llmops validate` and `llmops plan` work for it; remove it or use "
            f"--select to apply other resources.")


def _run_graph(project, changes, hooks, report, parallelism, keep_going, cancel) -> None:
    pending = {c.address: c for c in changes}
    in_work = set(pending)
    done: set[str] = set()
    running: dict[Future, ResourceChange] = {}
    stop = False

    def ready(c: ResourceChange) -> bool:
        return all(d not in in_work or d in done for d in c.depends_on)

    def skip_downstream(addr: str, why: str) -> None:
        todo = [addr]
        while todo:
            a = todo.pop()
            for c in list(pending.values()):
                if a in c.depends_on and c.address not in report.skipped:
                    report.skipped[c.address] = why
                    hooks.skipped(c.address, why)
                    del pending[c.address]
                    todo.append(c.address)

    with ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="llmops-apply") as pool:
        try:
            while pending or running:
                if not stop:
                    for c in [c for c in pending.values() if ready(c)]:
                        if len(running) >= parallelism:
                            break
                        del pending[c.address]
                        hooks.pre_apply(c)
                        running[pool.submit(_apply_change, project, c, hooks, cancel)] = c
                if not running:
                    break
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in finished:
                    c = running.pop(fut)
                    exc = fut.exception()
                    if exc is None:
                        _record(project, c, fut.result())
                        done.add(c.address)
                        report.applied.append(c.address)
                        hooks.post_apply(c, None)
                        hooks.recorded(c, project.lock.get(c.address).outputs)
                    else:
                        report.failed[c.address] = _message(exc)
                        hooks.post_apply(c, exc)
                        skip_downstream(c.address, f"upstream {c.address} failed")
                        if not keep_going:
                            stop = True
        except KeyboardInterrupt:
            cancel.set()
            stop = True
            report.interrupted = True
            # Let running work end (providers see `cancelled()`), record what finished.
            for fut, c in list(running.items()):
                try:
                    result = fut.result()
                except BaseException as exc:  # noqa: BLE001
                    report.failed[c.address] = _message(exc) if not isinstance(exc, KeyboardInterrupt) else "interrupted"
                    hooks.post_apply(c, exc)
                else:
                    _record(project, c, result)
                    report.applied.append(c.address)
                    hooks.post_apply(c, None)
            running.clear()
        for c in pending.values():
            why = "interrupted before it started" if report.interrupted else "apply stopped after a failure"
            report.skipped[c.address] = why
            hooks.skipped(c.address, why)


def _apply_change(project: Project, change: ResourceChange, hooks: ApplyHooks, cancel: threading.Event):
    if change.lock_only:
        return None
    provider = project.provider(change.kind)
    if provider is None:
        raise ProviderError(_no_provider(change.kind, change.address))
    upstream = {}
    for u in change.depends_on:
        entry = project.lock.get(u)
        if entry is None:
            raise ProviderError(f"{change.address}: upstream {u} has not been applied; run `llmops apply` without --select.")
        upstream[u] = entry
    request = ApplyRequest(
        address=change.address,
        name=change.name,
        spec=dict(project.config.resources[change.address].spec),
        action=change.action,
        fingerprint=change.after["fingerprint"],
        before=project.lock.get(change.address),
        upstream=upstream,
        private=change.private,
        progress=lambda event: hooks.progress(change.address, event),
        cancelled=cancel.is_set,
    )
    result = provider.restore(request) if change.action == "restore" else provider.apply(request)
    if not isinstance(result, ApplyResult):
        raise ProviderError(f"{change.address}: provider returned {type(result).__name__}, not ApplyResult")
    return result


def _record(project: Project, change: ResourceChange, result: ApplyResult | None) -> None:
    after = change.after or {}
    previous = project.lock.get(change.address)
    if result is None:  # lock-only update: keep what was recorded, refresh the spec
        inputs = previous.inputs if previous else {}
        outputs = previous.outputs if previous else {}
    else:
        inputs = dict(result.inputs)
        outputs = dict(result.outputs)
    if after.get("content") is not None:
        inputs["content"] = after["content"]
    project.lock.set(LockedResource(
        address=change.address,
        fingerprint=after["fingerprint"],
        spec=after.get("spec", {}),
        files=after.get("files", {}),
        upstreams=after.get("upstreams", {}),
        inputs=inputs,
        outputs=outputs,
    ))
    save_lock(project.lock, project.lock_path)
