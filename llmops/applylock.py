"""One apply at a time per project: `.llmops/apply.lock` holds id, pid, host and start time.

The file is created with O_EXCL. A lock left by a process that died on this host is taken
over (its pid is gone); any other held lock fails at once, naming the holder, and
`llmops force-unlock ID` clears it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from llmops.errors import ApplyLockedError, LlmopsError

LOCK_FILE = "apply.lock"


@dataclass
class ApplyLockInfo:
    id: str
    pid: int
    host: str
    started: str
    command: str = ""

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started} (lock ID {self.id})"


def _path(state_dir: Path) -> Path:
    return state_dir / LOCK_FILE


def read_apply_lock(state_dir: Path) -> ApplyLockInfo | None:
    try:
        raw = json.loads(_path(state_dir).read_text())
        return ApplyLockInfo(**{k: raw[k] for k in ("id", "pid", "host", "started")}, command=raw.get("command", ""))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return ApplyLockInfo(id="corrupt", pid=0, host="?", started="?")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ApplyLock:
    """Context manager holding the project's apply lock."""

    def __init__(self, state_dir: Path, command: str = "apply") -> None:
        self.state_dir = state_dir
        self.command = command
        self.info: ApplyLockInfo | None = None
        self.took_over: ApplyLockInfo | None = None

    def acquire(self) -> ApplyLockInfo:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        info = ApplyLockInfo(
            id=uuid.uuid4().hex[:12],
            pid=os.getpid(),
            host=socket.gethostname(),
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            command=self.command,
        )
        path = _path(self.state_dir)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_apply_lock(self.state_dir)
                if holder and holder.host == info.host and holder.pid and not _pid_alive(holder.pid):
                    # The holder died (e.g. SIGKILL): its lock is stale on this very host.
                    self.took_over = holder
                    path.unlink(missing_ok=True)
                    continue
                who = holder.describe() if holder else "unknown holder"
                raise ApplyLockedError(
                    f"another llmops apply holds this project's lock: {who}. Wait for it to finish; "
                    f"if it is not running any more, run `llmops force-unlock {holder.id if holder else ''}`."
                ) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(info.__dict__, fh)
            self.info = info
            return info
        raise ApplyLockedError(f"could not take the apply lock at {path}; run `llmops force-unlock`.")

    def release(self) -> None:
        if self.info is None:
            return
        holder = read_apply_lock(self.state_dir)
        if holder and holder.id == self.info.id:
            _path(self.state_dir).unlink(missing_ok=True)
        self.info = None

    def __enter__(self) -> "ApplyLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def force_unlock(state_dir: Path, lock_id: str) -> ApplyLockInfo:
    holder = read_apply_lock(state_dir)
    if holder is None:
        raise LlmopsError("no apply lock is held for this project; nothing to unlock.")
    if holder.id != lock_id:
        raise LlmopsError(f"the apply lock's ID is {holder.id}, not {lock_id}: {holder.describe()}. "
                          f"Run `llmops force-unlock {holder.id}` if that apply is really gone.")
    _path(state_dir).unlink(missing_ok=True)
    return holder
