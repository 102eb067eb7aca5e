"""Run DVC commands as child processes of one warm DVC interpreter.

`run(cwd, args, env, timeout)` does what `python -m dvc ARGS` in `cwd` with environment `env`
does, and answers the same `subprocess.CompletedProcess`, but a command costs a fork instead of
an interpreter start and DVC's import: `dvc status` 0.49 -> 0.14 s, init + repro + status +
remote + push + status --cloud 3.3 -> 1.0 s (bench/dvc_commands.py). The warm interpreter
freezes what it imported (`gc.freeze`) before it forks, so a child's garbage collections leave
the heap it inherited alone instead of walking, and copying, all of it (the six: 1.15 -> 0.98 s).

The warm interpreter (`python -m llmops.integrations.dvcrun`, this interpreter, started on the
first command, one per llmops process) imports DVC and the commands llmops uses, then reads one
request per line on stdin. For each, it forks a child that takes the request's folder, its whole
environment, /dev/null for stdin and two files for stdout and stderr, runs `dvc.cli.main(args)`
(what `python -m dvc` runs) and exits with its status. So each command still is its own process:
its own cwd, environment and exit, DVC's log handlers and repo lock in it alone, nothing shared
with llmops's threads. The warm interpreter never runs a command itself and starts no thread,
so forking it is safe.

A command past its `timeout` is killed (SIGKILL, as `subprocess.run` does) and
`subprocess.TimeoutExpired` raised. When the warm interpreter cannot start or dies, commands run
as plain `python -m dvc` subprocesses; `LLMOPS_DVC_FORK=0` asks for that always. The warm
interpreter exits when its stdin closes (this process exited, however it died), after the
command it is running.

Callers serialise commands (the datasets provider's lock); `run` holds its own lock too.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

FORK_ENV = "LLMOPS_DVC_FORK"
_START_TIMEOUT = 60.0
# What every command needs and the commands llmops runs, imported once by the warm interpreter.
_PRELOAD = ("dvc.cli", "dvc.repo", "dvc.commands.checkout", "dvc.commands.commit", "dvc.commands.data_sync",
            "dvc.commands.init", "dvc.commands.remote", "dvc.commands.repro", "dvc.commands.status",
            "dvc.repo.reproduce", "dvc.repo.status")
_lock = threading.Lock()
_server: _Server | None = None
_broken = False
_TIMEOUT = object()  # what `_Server.read` answers when nothing came in time


class _Server:
    """The warm interpreter and a line reader over its stdout (unbuffered, so a line that
    arrived is never hidden in a buffer while we wait on the pipe)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "llmops.integrations.dvcrun"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
                                     env=dict(os.environ, DVC_NO_ANALYTICS="1"))
        self.pending = b""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, message: dict[str, Any]) -> bool:
        data = json.dumps(message).encode() + b"\n"
        fd = self.proc.stdin.fileno()  # type: ignore[union-attr]
        try:
            while data:  # an unbuffered pipe may take a long request (its environment) in parts
                data = data[os.write(fd, data):]
            return True
        except OSError:
            return False

    def read(self, timeout: float | None) -> Any:
        """The next JSON line; None when the interpreter closed its end, _TIMEOUT past `timeout`."""
        import select

        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], wait)[0]:
                return _TIMEOUT
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            return None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.alive():
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()


def _start() -> _Server | None:
    global _server, _broken
    if _server is not None and _server.alive():
        return _server
    if _broken or os.environ.get(FORK_ENV, "").strip() == "0" or not hasattr(os, "fork"):
        return None
    try:
        server = _Server()
    except OSError:
        _broken = True
        return None
    ready = server.read(_START_TIMEOUT)
    if not isinstance(ready, dict) or ready.get("ready") is not True:
        _broken = True  # this process runs DVC the plain way from now on
        server.kill()
        return None
    if _server is None:
        atexit.register(_stop)
    _server = server
    return server


def _stop() -> None:
    if _server is not None:
        _server.stop()


def run(cwd: str | os.PathLike[str], args: list[str], env: dict[str, str],
        timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m dvc ARGS` in `cwd` with exactly `env`; stdin /dev/null, output captured."""
    global _broken
    cmd = [sys.executable, "-m", "dvc", *args]
    with _lock:
        server = _start() if os.path.isdir(cwd) else None  # a missing folder fails as subprocess.run fails
        if server is not None:
            with tempfile.TemporaryDirectory(prefix="llmops-dvc-") as tmp:
                out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
                request = {"cwd": os.fspath(cwd), "args": list(args), "env": dict(env), "stdout": out, "stderr": err}
                started = server.read(_START_TIMEOUT) if server.send(request) else None
                if isinstance(started, dict) and isinstance(started.get("pid"), int):
                    done = server.read(timeout)
                    if done is _TIMEOUT or done is None:
                        _kill(started["pid"])
                        if done is None or server.read(10.0) in (None, _TIMEOUT):
                            _broken = True  # the interpreter died or hangs: plain subprocesses from now on
                            server.kill()
                    if done is _TIMEOUT:
                        raise subprocess.TimeoutExpired(cmd, timeout or 0, output=_text(out), stderr=_text(err))
                    code = done.get("status") if isinstance(done, dict) else None
                    return subprocess.CompletedProcess(cmd, code if isinstance(code, int) else -signal.SIGKILL,
                                                       _text(out), _text(err))
                _broken = True  # it died before forking: this command runs the plain way
                server.kill()
        return subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


# --- the warm interpreter ------------------------------------------------------------------


def _child(request: dict[str, Any]) -> int:
    from dvc.cli import main

    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):
        opened = os.open(path, flags, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["dvc", *request["args"]]
    return int(main(list(request["args"])) or 0)


def serve() -> None:
    """The warm interpreter's loop (see the module docstring)."""
    import importlib

    for module in _PRELOAD:
        importlib.import_module(module)

    reply = sys.stdout
    if threading.active_count() != 1:  # forking a threaded process is not safe: say no
        reply.write(json.dumps({"ready": False}) + "\n")
        reply.flush()
        return
    # DVC, imported above, lives as long as every child: their collections skip it instead of
    # walking, and so copying page by page, the heap they share with this interpreter.
    gc.freeze()
    reply.write(json.dumps({"ready": True}) + "\n")
    reply.flush()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 255
            try:
                signal.signal(signal.SIGINT, signal.default_int_handler)  # as in `python -m dvc`
                code = _child(request)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - the child reports like `python -m dvc` does
                import traceback

                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        reply.write(json.dumps({"pid": pid}) + "\n")
        reply.flush()
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
        reply.flush()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the command being run, not this loop
    serve()
