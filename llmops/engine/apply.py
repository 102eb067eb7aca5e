"""apply_plan: run a plan's changes in dependency order, recording each success in the lock.

Independent resources run in parallel (threads; the heavy work happens in subprocesses or
native code). Only the calling thread touches the lock: each success is recorded as soon as
it is known (an fsynced line of the lock's journal, folded into llmops.lock when the apply
ends), so an interrupted or killed apply resumes where it stopped.
A failure skips everything downstream of it; by default nothing new starts after it.
Ctrl-C stops launching work, asks running work to stop, and keeps the lock consistent.

Scheduling costs the same per resource however big the project: each change waits on a count
of its unfinished upstreams, a completion decrements its dependents' counts, and changes whose
count reaches zero join a ready queue in plan order.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from llmops.errors import LlmopsError, ProviderError
from llmops.engine.lockfile import LockedResource, LockJournal
from llmops.engine.plan import Plan, ResourceChange
from llmops.engine.project import Project
from llmops.providers.base import ApplyRequest, ApplyResult, ProgressEvent


class ApplyHooks:
    """Callbacks through which apply reports (Terraform's Hook). Default: silent."""

    def pre_apply(self, change: ResourceChange) -> None: ...

    def post_apply(self, change: ResourceChange, error: BaseException | None) -> None: ...

    def recorded(self, change: ResourceChange, outputs: dict, summary: str = "") -> None:
        """A success was written to the lock with these outputs; `summary` is the provider's
        one line about them (`Provider.summary`)."""

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
    warm = WarmUp(project, work)

    journal = LockJournal(project.lock, project.lock_path)
    try:
        for change in [c for c in work if c.action == "delete"]:
            if cancel.is_set() or (report.failed and not keep_going):
                report.skipped[change.address] = "apply stopped before it started"
                continue
            _run_one(project, change, hooks, report, lambda: (warm.wait(change.kind), _delete(project, journal, change)))
        _run_graph(project, plan, journal, [c for c in work if c.action != "delete"], hooks, report,
                   parallelism, keep_going, cancel, warm)
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        journal.close()
    return report


class WarmUp:
    """The providers' warm-up (heavy imports, the tracking store's schema check) in one
    background thread, kind by kind in the order the plan first needs them, so that work
    which needs none of it (a DVC stage runs in a subprocess) starts at once instead of after
    seconds of imports. A change waits for its own kind's warm-up only (`wait`), and raises
    what that warm-up raised. Heavy libraries are still imported by one thread only: the
    changes of a kind that imports them start after its warm-up."""

    def __init__(self, project: Project, work: list[ResourceChange]) -> None:
        kinds = list(dict.fromkeys(c.kind for c in work if not c.lock_only))
        # Providers are made here, in the calling thread (Project caches them unlocked).
        providers = [(k, project.provider(k)) for k in kinds]
        self.done = {k: threading.Event() for k in kinds}
        self.errors: dict[str, BaseException] = {}
        self.thread = threading.Thread(target=self._run, args=(providers,), name="llmops-warm-up", daemon=True)
        self.thread.start()

    def _run(self, providers: list) -> None:
        for kind, provider in providers:
            try:
                if provider is not None:
                    provider.warm_up()
            except BaseException as exc:  # noqa: BLE001 - handed to the changes that need it
                self.errors[kind] = exc
            finally:
                self.done[kind].set()

    def wait(self, kind: str) -> None:
        event = self.done.get(kind)
        if event is None:
            return
        event.wait()
        exc = self.errors.get(kind)
        if exc is not None:
            if isinstance(exc, LlmopsError):
                raise type(exc)(exc.message)
            raise ProviderError(f"{kind}: warming up failed: {_message(exc)}")


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


def _delete(project: Project, journal: LockJournal, change: ResourceChange) -> None:
    locked = project.lock.get(change.address)
    provider = project.provider(change.kind)
    if provider is None:
        raise ProviderError(_no_provider(change.kind, change.address))
    if locked is not None:
        provider.delete(change.name, locked)
    journal.remove(change.address)


def _no_provider(kind: str, address: str) -> str:
    return (f"{address}: llmops cannot apply `{kind}` resources yet (no provider for this kind in "
            f"this version). `llmops validate` and `llmops plan` work for it; remove it or use "
            f"--select to apply other resources.")


def _run_graph(project, plan, journal, changes, hooks, report, parallelism, keep_going, cancel, warm) -> None:
    pending = {c.address: c for c in changes}
    order = {c.address: i for i, c in enumerate(changes)}
    waiting: dict[str, int] = {}  # address -> upstreams in this apply not yet applied
    dependents: dict[str, list[ResourceChange]] = {a: [] for a in pending}
    ready: list[tuple[int, str]] = []  # heap by plan position: launches keep the plan's order
    for c in changes:
        ups = {d for d in c.depends_on if d in pending}
        waiting[c.address] = len(ups)
        for d in ups:
            dependents[d].append(c)
        if not ups:
            ready.append((order[c.address], c.address))
    heapq.heapify(ready)
    running: dict[Future, ResourceChange] = {}
    stop = False

    def finished_ok(addr: str) -> None:
        for c in dependents[addr]:
            waiting[c.address] -= 1
            if waiting[c.address] == 0 and c.address in pending:
                heapq.heappush(ready, (order[c.address], c.address))

    def skip_downstream(addr: str, why: str) -> None:
        todo = [addr]
        while todo:
            for c in dependents[todo.pop()]:
                if c.address in pending and c.address not in report.skipped:
                    report.skipped[c.address] = why
                    hooks.skipped(c.address, why)
                    del pending[c.address]
                    todo.append(c.address)

    with ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="llmops-apply") as pool:
        try:
            while pending or running:
                while not stop and ready and len(running) < parallelism:
                    c = pending.pop(heapq.heappop(ready)[1], None)
                    if c is None:
                        continue  # skipped since it became ready
                    hooks.pre_apply(c)
                    running[pool.submit(_apply_change, project, plan, c, hooks, cancel, warm)] = c
                if not running:
                    break
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in finished:
                    c = running.pop(fut)
                    exc = fut.exception()
                    if exc is None:
                        _record(journal, c, fut.result())
                        report.applied.append(c.address)
                        hooks.post_apply(c, None)
                        outputs = project.lock.get(c.address).outputs
                        provider = project.provider(c.kind)
                        hooks.recorded(c, outputs, provider.summary(outputs) if provider else "")
                        finished_ok(c.address)
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
                    _record(journal, c, result)
                    report.applied.append(c.address)
                    hooks.post_apply(c, None)
            running.clear()
        for c in pending.values():
            why = "interrupted before it started" if report.interrupted else "apply stopped after a failure"
            report.skipped[c.address] = why
            hooks.skipped(c.address, why)


def _apply_change(project: Project, plan: Plan, change: ResourceChange, hooks: ApplyHooks,
                  cancel: threading.Event, warm: WarmUp | None = None):
    if change.lock_only:
        return None
    if warm is not None:
        warm.wait(change.kind)
    provider = project.provider(change.kind)
    if provider is None:
        raise ProviderError(_no_provider(change.kind, change.address))
    upstream = {}
    for u in change.depends_on:
        entry = project.lock.get(u)
        if entry is None:
            raise ProviderError(f"{change.address}: upstream {u} has not been applied; run `llmops apply` without --select.")
        upstream[u] = entry
    spec = plan.specs.get(change.address)
    if spec is None:  # a Plan built without specs (not by make_plan or check_saved_plan)
        raise ProviderError(f"{change.address}: the plan holds no spec for it; run `llmops plan` again.")
    request = ApplyRequest(
        address=change.address,
        name=change.name,
        spec=dict(spec),
        action=change.action,
        fingerprint=change.after["fingerprint"],
        before=project.lock.get(change.address),
        upstream=upstream,
        private=change.private,
        upstream_specs=_UpstreamSpecs(plan, change),
        log=lambda message: project.log(change.address, message),
        progress=lambda event: hooks.progress(change.address, event),
        cancelled=cancel.is_set,
    )
    result = provider.restore(request) if change.action == "restore" else provider.apply(request)
    if not isinstance(result, ApplyResult):
        raise ProviderError(f"{change.address}: provider returned {type(result).__name__}, not ApplyResult")
    return result


class _UpstreamSpecs(Mapping):
    """The planned spec of every resource a change depends on, directly or not: walked on first
    use only (most providers never read it), so apply stays linear in the plan's size."""

    def __init__(self, plan: Plan, change: ResourceChange) -> None:
        self._plan, self._change = plan, change
        self._specs: dict[str, dict] | None = None

    def _resolved(self) -> dict[str, dict]:
        if self._specs is None:
            deps = self._plan.depends_on()
            seen: dict[str, dict] = {}
            todo = list(self._change.depends_on)
            while todo:
                u = todo.pop()
                if u in seen or u not in self._plan.specs:
                    continue
                seen[u] = self._plan.specs[u]
                todo.extend(deps.get(u, ()))
            self._specs = dict(sorted(seen.items()))
        return self._specs

    def __getitem__(self, address: str) -> dict:
        return self._resolved()[address]

    def __iter__(self):
        return iter(self._resolved())

    def __len__(self) -> int:
        return len(self._resolved())


def _record(journal: LockJournal, change: ResourceChange, result: ApplyResult | None) -> None:
    after = change.after or {}
    previous = journal.lock.get(change.address)
    if result is None:  # lock-only update: keep what was recorded, refresh the spec
        inputs = previous.inputs if previous else {}
        outputs = previous.outputs if previous else {}
    else:
        inputs = dict(result.inputs)
        outputs = dict(result.outputs)
    if after.get("content") is not None:
        inputs["content"] = after["content"]
    journal.set(LockedResource(
        address=change.address,
        fingerprint=after["fingerprint"],
        spec=after.get("spec", {}),
        files=after.get("files", {}),
        upstreams=after.get("upstreams", {}),
        inputs=inputs,
        outputs=outputs,
    ))
