"""The local runner: a job is a subprocess of the current Python environment.

Combined stdout/stderr is streamed line by line to the job's log file and to `on_line`.
`cancelled()` is polled while the job runs; cancelling sends SIGTERM to the job's process
group, then SIGKILL after a grace period. `gpus > 1` runs the module under
`accelerate launch` with one process per GPU.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Callable

from llmops.runners.base import Job, JobResult, Runner

TAIL_LINES = 40
GRACE_S = 10.0
POLL_S = 0.2


def job_command(job: Job) -> list[str]:
    """The argv that runs `job` here (accelerate's launcher for more than one GPU)."""
    if job.gpus > 1:
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(job.gpus),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--module",
            job.module,
            *job.args,
        ]
    return [sys.executable, "-m", job.module, *job.args]


class LocalRunner(Runner):
    """Runs jobs as local subprocesses (same interpreter, same installed packages)."""

    def __init__(self, grace_s: float = GRACE_S) -> None:
        self.grace_s = grace_s

    def run(
        self,
        job: Job,
        on_line: Callable[[str], None] = lambda line: None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> JobResult:
        env = {**os.environ, **job.env, "PYTHONUNBUFFERED": "1"}
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        with open(job.log_path, "a", encoding="utf-8") as log:
            proc = subprocess.Popen(
                job_command(job),
                cwd=job.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                start_new_session=True,  # its own process group: cancel reaches accelerate's workers too
            )
            lines: queue.Queue[str | None] = queue.Queue()
            reader = threading.Thread(target=_pump, args=(proc, lines), daemon=True)
            reader.start()
            stopping_since: float | None = None
            while True:
                try:
                    line = lines.get(timeout=POLL_S)
                except queue.Empty:
                    line = ""
                if line is None:
                    break
                if line:
                    log.write(line)
                    log.flush()
                    text = line.rstrip("\n")
                    tail.append(text)
                    on_line(text)
                if stopping_since is None and cancelled():
                    stopping_since = time.monotonic()
                    _signal_group(proc, signal.SIGTERM)
                    tail.append("llmops: job cancelled; stopping it")
                elif stopping_since is not None and time.monotonic() - stopping_since > self.grace_s:
                    _signal_group(proc, signal.SIGKILL)
            code = proc.wait()
            reader.join(timeout=5)
        return JobResult(exit_code=code, log_tail="\n".join(tail))


def _pump(proc: subprocess.Popen, lines: queue.Queue) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line)
    lines.put(None)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
