"""One apply at a time per project: a kernel lock on `.llmops/apply.lock`, plus a lease in the
shared model registry when the project's MLflow stores are shared by several checkouts.

Invariants:

- **Local lock.** The holder has `.llmops/apply.lock` open with `flock(LOCK_EX)` and has written
  its `ApplyLockInfo` (JSON: id, pid, host, started, command) into it. The kernel drops the lock
  when the holder's process ends, however it ends, so on this host there is never a stale lock
  and never two holders; the file is never deleted (deleting a flocked file lets a third process
  lock a new inode beside the old one). The fd is close-on-exec, so servers and training jobs an
  apply starts do not inherit the lock. A clean release empties the file before unlocking, so a
  taker that finds holder info in an unlocked file knows that holder died (`took_over`); an
  empty or unreadable file is simply taken.
- **Shared lease** (`SharedLease`, only when the registry URI is not local: an `http(s)://`
  tracking server or a database every checkout reaches). Lease = registered model
  `llmops-apply-lock.<project>.<generation>` whose tags hold the holder info and `expires` (epoch
  seconds). It is live until `expires`; the holder renews it from a daemon thread every
  `renew_every` seconds and deletes it on release. A taker creates generation highest+1 only when
  no live lease exists: creating a registered model is atomic, so of two racing takers one gets
  RESOURCE_ALREADY_EXISTS. A taker whose view was stale could still create an old, already
  deleted generation, so after creating it searches again and backs off when another live lease
  was created no later than its own (server timestamps): the earliest live lease holds. A holder
  whose renewals failed for a whole TTL stops and reports `lost`; release and renewal check the
  lease's lock ID first (a force-unlocked generation's name can be reused). Hosts' clocks must
  agree to well within the TTL (NTP).
- One `ApplyLock` holds both with the same lock ID: the local lock first, then the lease; release
  in reverse. `timeout` retries both until a deadline, then refuses like timeout 0.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from llmops.errors import ApplyLockedError, LlmopsError
from llmops.engine.lockfile import compact_journal
from llmops.redact import redact_url

if TYPE_CHECKING:
    from llmops.engine.project import Project

LOCK_FILE = "apply.lock"
LEASE_PREFIX = "llmops-apply-lock."
LEASE_TTL = 600.0  # seconds a shared lease lives without renewal
RENEW_EVERY = 60.0
_POLL = 0.2  # seconds between local retries under --lock-timeout
_LEASE_POLL = 1.0  # between shared retries (each one asks the tracking server)


@dataclass
class ApplyLockInfo:
    id: str
    pid: int
    host: str
    started: str
    command: str = ""

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started} (lock ID {self.id})"

    @classmethod
    def new(cls, command: str) -> "ApplyLockInfo":
        return cls(id=uuid.uuid4().hex[:12], pid=os.getpid(), host=socket.gethostname(),
                   started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), command=command)

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> "ApplyLockInfo | None":
        try:
            return cls(id=str(raw["id"]), pid=int(raw["pid"]), host=str(raw["host"]),
                       started=str(raw["started"]), command=str(raw.get("command", "")))
        except (KeyError, TypeError, ValueError):
            return None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


# TODO: llmops/monitor/spec.py parses its window durations separately (no fractions, adds `d`);
# one parser should serve both once that module can depend on a shared helper.
def parse_duration(text: str) -> float:
    """Seconds in a Terraform-style duration: `0`, `45` (seconds), `30s`, `2m`, `1m30s`, `1h`."""
    value = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    if value and _DURATION.sub("", value) == "":
        return sum(float(n) * _UNIT[u] for n, u in _DURATION.findall(value))
    raise LlmopsError(f"'{text}' is not a duration; use e.g. 0, 30s, 2m or 1h30m.")


def _path(state_dir: Path) -> Path:
    return state_dir / LOCK_FILE


def _parse_text(text: str) -> ApplyLockInfo | None:
    try:
        raw = json.loads(text)
    except ValueError:
        return None
    return ApplyLockInfo.parse(raw) if isinstance(raw, dict) else None


def read_apply_lock(state_dir: Path) -> ApplyLockInfo | None:
    """The holder info in `.llmops/apply.lock` (of the holder, or of one that died): None if empty."""
    try:
        text = _path(state_dir).read_text()
    except FileNotFoundError:
        return None
    if not text.strip():
        return None
    return _parse_text(text) or ApplyLockInfo(id="corrupt", pid=0, host="?", started="?")


def _flock(path: Path) -> int | None:
    """An fd of `path` holding its exclusive flock, or None when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            raise LlmopsError(f"cannot lock {path} ({exc.strerror}); its file system does not support "
                              "file locks: keep .llmops on a local disk.") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the file was deleted or replaced while we locked it: lock the one there now


def _read_fd(fd: int) -> str:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 65536, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


class LocalLock:
    """The kernel lock on `.llmops/apply.lock` (see the module docstring)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = _path(state_dir)
        self.fd: int | None = None

    def try_acquire(self, info: ApplyLockInfo) -> tuple[bool, ApplyLockInfo | None]:
        """(True, dead previous holder or None) when taken; (False, holder or None) when held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = _flock(self.path)
        if fd is None:
            return False, read_apply_lock(self.path.parent)
        previous = _parse_text(_read_fd(fd))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(info)).encode(), 0)
        self.fd = fd
        return True, previous

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)  # empty before unlocking: the next taker sees a clean release
        finally:
            os.close(fd)


@dataclass
class _Lease:
    name: str
    generation: int
    info: ApplyLockInfo
    expires: float
    created: int  # server's creation timestamp (ms)


class SharedLease:
    """The project's apply lease in a shared MLflow model registry (see the module docstring).

    `client` makes an MlflowClient; `check` fails fast (clearly) when the server is unreachable.
    `lost` is set when a renewal finds the lease gone or taken (force-unlocked, or expired).
    """

    def __init__(self, client: Callable[[], Any], uri: str, project: str, ttl: float = LEASE_TTL,
                 renew_every: float | None = None, check: Callable[[], None] | None = None) -> None:
        self._client_factory = client
        self._client: Any = None
        self.uri = uri
        self.project = project
        self.prefix = LEASE_PREFIX + re.sub(r"[^A-Za-z0-9_.-]", "-", project) + "."
        self.ttl = ttl
        self.renew_every = renew_every if renew_every is not None else min(RENEW_EVERY, ttl / 3)
        self.check = check
        self.name: str | None = None
        self.info: ApplyLockInfo | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._expires = 0.0  # when our lease lapses unless renewed (this host's clock)

    # -- registry access, every failure named with the server --------------------------------
    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        if self._client is None:
            if self.check:
                self.check()
            self._client = self._client_factory()
        try:
            return fn(self._client)
        except Exception as exc:  # noqa: BLE001 - the REST store raises many types
            if getattr(exc, "error_code", "") in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
            raise LlmopsError(
                f"cannot {what} the shared apply lock in the model registry {self.uri} "
                f"({type(exc).__name__}: {str(exc)[:200]}); start the tracking server or fix "
                "settings.tracking_uri / settings.registry_uri.") from exc

    def leases(self) -> list[_Lease]:
        """Every lease of this project, by generation (live or expired)."""
        out: list[_Lease] = []
        token = None
        while True:
            page = self._call("read", lambda c: c.search_registered_models(
                filter_string=f"name LIKE '{self.prefix}%'", max_results=100, page_token=token))
            for model in page:
                rest = model.name[len(self.prefix):]
                if not model.name.startswith(self.prefix) or not rest.isdigit():
                    continue  # LIKE's `_` matches any character; keep this project's names only
                tags = model.tags or {}
                info = ApplyLockInfo.parse({k.removeprefix("llmops."): v for k, v in tags.items()})
                try:
                    expires = float(tags.get("llmops.expires", 0))
                except ValueError:
                    expires = 0.0
                out.append(_Lease(model.name, int(rest), info or ApplyLockInfo("corrupt", 0, "?", "?"),
                                  expires, int(model.creation_timestamp or 0)))
            token = page.token
            if not token:
                return sorted(out, key=lambda lease: lease.generation)

    def _tags(self, info: ApplyLockInfo) -> dict[str, str]:
        self._expires = time.time() + self.ttl
        tags = {f"llmops.{k}": str(v) for k, v in asdict(info).items()}
        tags["llmops.expires"] = f"{self._expires:.3f}"
        return tags

    def _delete(self, name: str, lock_id: str | None) -> bool:
        """Delete lease `name` if it still carries `lock_id` (any lease when None)."""
        from mlflow.exceptions import MlflowException

        try:
            if lock_id is not None:
                model = self._call("read", lambda c: c.get_registered_model(name))
                if (model.tags or {}).get("llmops.id") != lock_id:
                    return False
            self._call("release", lambda c: c.delete_registered_model(name))
            return True
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise

    # -- taking and giving back ---------------------------------------------------------------
    def try_acquire(self, info: ApplyLockInfo) -> tuple[bool, ApplyLockInfo | None]:
        """(True, expired previous holder or None) when taken; (False, live holder) when held."""
        from mlflow.exceptions import MlflowException

        leases = self.leases()
        live = sorted((x for x in leases if x.expires > time.time()), key=lambda x: (x.created, x.name))
        if live:
            return False, live[0].info
        name = f"{self.prefix}{(leases[-1].generation if leases else 0) + 1}"
        description = (f"Apply lock of llmops project '{self.project}', held by {info.describe()}. "
                       f"llmops deletes it when that {info.command} ends; `llmops force-unlock {info.id}` "
                       "removes it by hand.")
        try:
            self._call("take", lambda c: c.create_registered_model(
                name, tags=self._tags(info), description=description))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return False, self._first_live_holder()  # another taker created it first
        after = self.leases()
        mine = next((x for x in after if x.name == name and x.info.id == info.id), None)
        rivals = [x for x in after if x.name != name and x.expires > time.time()
                  and (mine is None or x.created <= mine.created)]
        if mine is None or rivals:  # a stale view raced a newer taker: the earliest live lease holds
            self._delete(name, info.id)
            return False, rivals[0].info if rivals else self._first_live_holder()
        for old in leases:  # expired generations (their holders died): clean up
            self._delete(old.name, old.info.id if old.info.id != "corrupt" else None)
        self.name, self.info, self.lost = name, info, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="llmops-apply-lease", daemon=True)
        self._thread.start()
        return True, leases[-1].info if leases else None

    def _first_live_holder(self) -> ApplyLockInfo | None:
        live = sorted((x for x in self.leases() if x.expires > time.time()), key=lambda x: (x.created, x.name))
        return live[0].info if live else None

    def _renew_loop(self) -> None:
        from mlflow.exceptions import MlflowException

        while not self._stop.wait(self.renew_every):
            name, info = self.name, self.info
            if name is None or info is None:
                return
            if time.time() >= self._expires:  # renewals failed for a whole TTL: another may hold it now
                self.lost = f"the shared apply lock {name} lapsed (the tracking server did not answer renewals)"
                return
            try:
                model = self._client.get_registered_model(name)
                if (model.tags or {}).get("llmops.id") != info.id:
                    self.lost = f"the shared apply lock {name} now belongs to another apply"
                    return
                expires = time.time() + self.ttl
                self._client.set_registered_model_tag(name, "llmops.expires", f"{expires:.3f}")
                self._expires = expires
            except MlflowException as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    self.lost = f"the shared apply lock {name} was removed (force-unlock?)"
                    return
            except Exception:  # noqa: BLE001 - a server blip: try again next round
                continue

    def release(self) -> None:
        if self.name is None or self.info is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        name, lock_id = self.name, self.info.id
        self.name = self.info = None
        try:
            self._delete(name, lock_id)
        except LlmopsError:
            pass  # the server is gone: the lease expires on its own

    def force_unlock(self, lock_id: str) -> ApplyLockInfo | None:
        """Delete the leases with `lock_id`; their holder, or None when no lease has that ID."""
        removed = None
        for lease in self.leases():
            if lease.info.id == lock_id and self._delete(lease.name, lock_id):
                removed = lease.info
        return removed


def shared_lease_for(root: Path, settings: dict[str, Any], project: str, ttl: float = LEASE_TTL,
                     renew_every: float | None = None) -> SharedLease | None:
    """The project's shared lease when its model registry is not local, else None."""
    from llmops.integrations import mlflow as tracking

    registry = tracking.registry_uri(root, settings)
    if tracking.is_local(registry):
        return None

    def check() -> None:
        tracking.check_store(root, settings)  # both the tracking and the registry URI

    return SharedLease(lambda: tracking.client(root, settings), redact_url(registry), project, ttl=ttl,
                       renew_every=renew_every, check=check)


class ApplyLock:
    """Context manager holding the project's apply lock: the local kernel lock, and the shared
    lease when `shared` is given, both under one lock ID. `timeout` (seconds) retries until the
    lock is free, then refuses as timeout 0 does. `took_over` names a previous holder that died
    holding it (its info was still in the file, or its lease had expired); `lost` says when the
    shared lease was taken away while held. With `lock_path`, the journal a killed apply left
    beside that llmops.lock is folded into it once the lock is held, so the file to commit is
    complete even when this apply has nothing to do."""

    def __init__(self, state_dir: Path, command: str = "apply", timeout: float = 0.0,
                 shared: SharedLease | None = None, lock_path: Path | None = None) -> None:
        self.state_dir = state_dir
        self.lock_path = lock_path
        self.command = command
        self.timeout = max(0.0, timeout)
        self.shared = shared
        self.info: ApplyLockInfo | None = None
        self.took_over: ApplyLockInfo | None = None
        self._local = LocalLock(state_dir)

    @classmethod
    def for_project(cls, project: Project, command: str = "apply", timeout: float = 0.0,
                    lease_ttl: float = LEASE_TTL, renew_every: float | None = None) -> "ApplyLock":
        """The lock of an opened project: shared too when its model registry is not local."""
        config = project.config
        shared = shared_lease_for(project.root, config.settings, str(config.data.get("project", "")),
                                  ttl=lease_ttl, renew_every=renew_every)
        return cls(project.state_dir, command=command, timeout=timeout, shared=shared,
                   lock_path=project.lock_path)

    @property
    def lost(self) -> str | None:
        return self.shared.lost if self.shared else None

    def acquire(self) -> ApplyLockInfo:
        info = ApplyLockInfo.new(self.command)
        deadline = time.monotonic() + self.timeout
        ok, other = _retry(lambda: self._local.try_acquire(info), deadline, _POLL)
        if not ok:
            raise ApplyLockedError(self._local_refusal(other))
        self.took_over = other
        if self.shared is not None:
            try:
                ok, other = _retry(lambda: self.shared.try_acquire(info), deadline, _LEASE_POLL)
            except BaseException:
                self._local.release()
                raise
            if not ok:
                self._local.release()
                raise ApplyLockedError(self._shared_refusal(other))
            self.took_over = self.took_over or other
        self.info = info
        if self.lock_path is not None:
            try:
                compact_journal(self.lock_path)
            except BaseException:
                self.release()
                raise
        return info

    def release(self) -> None:
        if self.info is None:
            return
        if self.shared is not None:
            self.shared.release()
        self._local.release()
        self.info = None

    def __enter__(self) -> "ApplyLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _waited(self) -> str:
        return f" (waited {self.timeout:g}s)" if self.timeout else ""

    def _local_refusal(self, holder: ApplyLockInfo | None) -> str:
        if holder is None or holder.id == "corrupt":
            return (f"another llmops process holds this project's apply lock{self._waited()} and has not "
                    "written its details yet; try again, or pass --lock-timeout 30s to wait for it.")
        stop = f"stop it (`kill {holder.pid}`)" if holder.host == socket.gethostname() else f"stop it on {holder.host}"
        return (f"another llmops {holder.command or 'apply'} holds this project's apply lock{self._waited()}: "
                f"{holder.describe()}. It is running (the lock ends with its process): wait for it to "
                f"finish, pass --lock-timeout 5m to wait, or {stop}.")

    def _shared_refusal(self, holder: ApplyLockInfo | None) -> str:
        assert self.shared is not None
        where = f"the shared apply lock of project '{self.shared.project}' in {self.shared.uri}"
        if holder is None:
            return f"another llmops apply took {where} just now{self._waited()}; try again, or pass --lock-timeout 5m."
        return (f"another llmops {holder.command or 'apply'} holds {where}{self._waited()}: {holder.describe()}. "
                "Wait for it to finish or pass --lock-timeout 5m; if it is not running any more, run "
                f"`llmops force-unlock {holder.id}` (its lease otherwise lapses within "
                f"{self.shared.ttl / 60:g} minutes).")


def _retry(attempt: Callable[[], tuple[bool, ApplyLockInfo | None]], deadline: float,
           poll: float) -> tuple[bool, ApplyLockInfo | None]:
    while True:
        ok, other = attempt()
        left = deadline - time.monotonic()
        if ok or left <= 0:
            return ok, other
        time.sleep(min(poll, left))


def force_unlock(state_dir: Path, lock_id: str, shared: SharedLease | None = None) -> ApplyLockInfo:
    """Clear the apply lock `lock_id`: the local file's record of a holder that died, and the
    shared lease with that ID. A local holder that is still running is refused: its kernel lock
    cannot be broken, and ends with its process."""
    local = read_apply_lock(state_dir)
    removed: ApplyLockInfo | None = None
    if local is not None and local.id == lock_id:
        fd = _flock(_path(state_dir))
        if fd is None:
            raise LlmopsError(f"the {local.command or 'apply'} holding lock {lock_id} is still running "
                              f"({local.describe()}); wait for it, or stop it first (`kill {local.pid}` on "
                              f"{local.host}).")
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        removed = local
    if shared is not None:
        removed = shared.force_unlock(lock_id) or removed
    if removed is not None:
        return removed
    held = [local] if local else []
    if shared is not None:
        held += [lease.info for lease in shared.leases()]
    if not held:
        raise LlmopsError("no apply lock is held for this project; nothing to unlock.")
    other = held[-1]
    raise LlmopsError(f"the apply lock's ID is {other.id}, not {lock_id}: {other.describe()}. "
                      f"Run `llmops force-unlock {other.id}` if that apply is really gone.")


def force_unlock_project(root: Path, lock_id: str, target: str | None = None) -> ApplyLockInfo:
    """`force_unlock` for the project at `root`, shared lease included when its registry is shared."""
    from llmops.engine.project import STATE_DIR
    from llmops.config.validate import load_config

    root = Path(root).resolve()
    config = load_config(root, target=target)
    shared = shared_lease_for(root, config.settings, str(config.data.get("project", "")))
    return force_unlock(root / STATE_DIR, lock_id, shared)
