"""A warm parent for the hostile cases: one fresh interpreter that imports what `llmops
validate`, `plan` and `apply` load, then forks a child per command.

Each child is its own process, as a fresh `python -m llmops` would be: its own working
directory, environment (the planted secret in it), address-space cap (RLIMIT_AS), stdin
from /dev/null, stdout and stderr in files, and exit status. What it does not repeat is
starting an interpreter and importing click, rich, yaml, jsonschema, jinja2 and the llmops
modules these commands load (about 0.25 s a command here); the parent itself never runs a
command, so every child starts from the same state. The child runs tests/hostile/measured.py
as a fresh interpreter would; its peak memory, /proc/self/status VmHWM, starts at what it
inherited resident from this parent (about what those imports cost a fresh interpreter).
The parent freezes its objects before the first fork (`gc.freeze`, as Python's documentation
advises for a parent that forks without exec), so a child's collections leave them alone.

Protocol, one JSON object per line: the test writes {"cwd", "env", "args", "stdout",
"stderr", "peak", "timeout", "memory_limit"} on stdin; the server answers {"rc"} or
{"timeout": true} (the child killed) on stdout.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import runpy
import signal
import sys
import time
from pathlib import Path

# What the commands under test import anyway (nothing heavy: no torch, mlflow or dvc), down to
# what a command imports only when it runs (what is left to each child is about 1 ms of imports).
import click  # noqa: F401
import concurrent.futures.thread  # noqa: F401
import configparser  # noqa: F401
import jinja2.meta  # noqa: F401
import jinja2.sandbox  # noqa: F401
import jsonschema  # noqa: F401
import logging  # noqa: F401
import pkgutil  # noqa: F401
import rich._emoji_codes  # noqa: F401 - rich's markup loads it at the first render
import rich.console  # noqa: F401
import secrets  # noqa: F401
import socket  # noqa: F401
import subprocess  # noqa: F401
import yaml  # noqa: F401

import llmops.cli.commands  # noqa: F401
import llmops.cli.github_actions  # noqa: F401
import llmops.cli.main  # noqa: F401
import llmops.cli.render  # noqa: F401
import llmops.config.validate  # noqa: F401
import llmops.engine.apply  # noqa: F401
import llmops.engine.applylock  # noqa: F401
import llmops.engine.cost  # noqa: F401
import llmops.engine.planner  # noqa: F401
import llmops.integrations.dvcrun  # noqa: F401 - its module only: DVC itself is imported by its own interpreter
import llmops.operations.plan_markdown  # noqa: F401
import llmops.providers.tracking_store  # noqa: F401
import llmops.templating.prompt_template  # noqa: F401

MEASURED = Path(__file__).resolve().parent / "measured.py"  # `llmops ARGS`, its peak memory written at exit


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
    os.environ["LLMOPS_PEAK_RSS_FILE"] = req["peak"]
    sys.argv = [str(MEASURED), *req["args"]]
    runpy.run_path(str(MEASURED), run_name="__main__")  # as the fresh interpreter runs it: peak at exit
    sys.exit(0)


def main() -> None:
    # What was imported above lives as long as every child: the children's collections, and
    # the one at their interpreter's shutdown, skip it instead of walking (and so copying, page
    # by page) the whole inherited heap. A child's exit 55 -> 19 ms; what runs at exit is the same.
    gc.freeze()
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
