"""A warm parent for the hostile cases: one fresh interpreter that imports what `llmops
validate`, `plan` and `apply` load, then forks a child per command.

Each child is its own process, as a fresh `python -m llmops` would be: its own working
directory, environment (the planted secret in it), address-space cap (RLIMIT_AS), stdin
from /dev/null, stdout and stderr in files, and exit status. What it does not repeat is
starting an interpreter and importing click, rich, yaml, jsonschema, jinja2 and llmops'
config and engine modules (about 0.25 s a command here); the parent itself never runs a
command, so every child starts from the same state. Its peak memory is /proc/self/status
VmHWM, which starts at what it inherited resident from this parent (about what those
imports cost a fresh interpreter).

Protocol, one JSON object per line: the test writes {"cwd", "env", "args", "stdout",
"stderr", "peak", "timeout", "memory_limit"} on stdin; the server answers {"rc"} or
{"timeout": true} (the child killed) on stdout.
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import signal
import sys
import time

# What the commands under test import anyway (nothing heavy: no torch, mlflow or dvc).
import click  # noqa: F401
import jinja2.sandbox  # noqa: F401
import jsonschema  # noqa: F401
import rich.console  # noqa: F401
import yaml  # noqa: F401

import llmops.cli.commands  # noqa: F401
import llmops.cli.main  # noqa: F401
import llmops.config.validate  # noqa: F401
import llmops.engine.planner  # noqa: F401


def _peak() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(req: dict) -> None:
    """Become `llmops ARGS` in the request's folder and environment; never returns."""
    os.setsid()
    resource.setrlimit(resource.RLIMIT_AS, (req["memory_limit"], req["memory_limit"]))
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    for target, path in ((1, req["stdout"]), (2, req["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, target)
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", closefd=False, buffering=1)
    sys.stderr = open(2, "w", closefd=False, buffering=1)
    sys.argv = ["llmops", *req["args"]]
    sys.path[0] = req["cwd"]  # as `python -m llmops` has it
    import atexit

    def report() -> None:
        with open(req["peak"], "w", encoding="ascii") as fh:
            fh.write(str(_peak()))

    atexit.register(report)
    runpy.run_module("llmops", run_name="__main__", alter_sys=True)
    sys.exit(0)


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(req)  # exits through SystemExit, running the interpreter's shutdown and atexit
        deadline = time.monotonic() + float(req["timeout"])
        reply: dict = {}
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                reply = {"rc": os.waitstatus_to_exitcode(status)}
                break
            if time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                reply = {"timeout": True}
                break
            time.sleep(0.005)
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
