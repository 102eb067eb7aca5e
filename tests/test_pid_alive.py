"""`llmops.serve.endpoint.pid_alive`, the one liveness check for a server's pid: a zombie
(a child that exited and is not yet reaped) counts as gone, a running process as alive."""

from __future__ import annotations

import os
import subprocess
import sys

from llmops.serve.endpoint import pid_alive


def test_a_running_process_is_alive() -> None:
    assert pid_alive(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert not pid_alive(proc.pid)  # reaped: no such process


def test_a_zombie_child_is_not_alive() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        # Wait for it to exit without reaping it (WNOWAIT): it stays a zombie until `wait`.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        with open(f"/proc/{proc.pid}/stat", encoding="ascii") as fh:
            assert fh.read().rsplit(")", 1)[1].split()[0] == "Z"  # really a zombie
        os.kill(proc.pid, 0)  # which signal 0 still reaches
        assert not pid_alive(proc.pid)
    finally:
        proc.wait()


def test_no_process_group_is_taken_for_a_process() -> None:
    assert not pid_alive(0) and not pid_alive(-1)
