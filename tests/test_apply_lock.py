"""One apply at a time; a SIGKILLed apply leaves a loadable lock and the next one resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmops.applylock import ApplyLock, force_unlock, read_apply_lock
from llmops.errors import ApplyLockedError, LlmopsError
from llmops.lockfile import load_lock

from test_engine import CONFIG


def test_second_apply_fails_naming_the_holder(tmp_path):
    with ApplyLock(tmp_path) as first:
        with pytest.raises(ApplyLockedError) as info:
            ApplyLock(tmp_path).acquire()
        msg = info.value.message
        assert f"pid {os.getpid()}" in msg and first.info.id in msg
        assert f"llmops force-unlock {first.info.id}" in msg
    assert read_apply_lock(tmp_path) is None


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    lock = ApplyLock(tmp_path)
    lock.acquire()
    info = read_apply_lock(tmp_path)
    (tmp_path / "apply.lock").write_text(json.dumps({**info.__dict__, "pid": proc.pid, "id": "deadbeef"}))
    lock.info = None  # forget ours; the file now names a dead pid
    again = ApplyLock(tmp_path)
    again.acquire()
    assert again.took_over is not None and again.took_over.id == "deadbeef"
    again.release()


def test_force_unlock_checks_the_id(tmp_path):
    (tmp_path / "apply.lock").write_text(json.dumps(
        {"id": "abc123", "pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(ApplyLockedError, match="pid 1 on elsewhere"):
        ApplyLock(tmp_path).acquire()
    with pytest.raises(LlmopsError, match="ID is abc123, not nope"):
        force_unlock(tmp_path, "nope")
    assert force_unlock(tmp_path, "abc123").host == "elsewhere"
    with pytest.raises(LlmopsError, match="no apply lock"):
        force_unlock(tmp_path, "abc123")


_APPLY_SCRIPT = r"""
import sys
sys.path.insert(0, {tests!r})
import engine_providers as ep
from llmops.apply import apply_plan
from llmops.applylock import ApplyLock
from llmops.planner import make_plan
from llmops.project import open_project
p = open_project(__import__("pathlib").Path({root!r}), provider_overrides=ep.OVERRIDES)
with ApplyLock(p.state_dir):
    apply_plan(p, make_plan(p), parallelism=1)
"""


def test_sigkill_mid_apply_leaves_a_valid_lock_and_the_next_apply_resumes(project):
    project.write({"llmops.yaml": CONFIG, "data/a.jsonl": '{"question": "a"}\n',
                   "data/b.jsonl": '{"question": "b"}\n', "SLOW_f": ""})
    script = _APPLY_SCRIPT.format(tests=str(Path(__file__).parent), root=str(project.root))
    proc = subprocess.Popen([sys.executable, "-c", script])
    lock_path = project.path("llmops.lock")
    deadline = time.time() + 60
    while time.time() < deadline:
        if lock_path.exists() and "base_models.m" in load_lock(lock_path).resources:
            break
        time.sleep(0.05)
    time.sleep(0.2)  # finetunes.f is now running (it waits while SLOW_f exists)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lock = load_lock(lock_path)  # still loads
    assert {"datasets.a", "base_models.m"} <= set(lock.resources)
    assert "finetunes.f" not in lock.resources
    assert read_apply_lock(project.path(".llmops")).pid == proc.pid  # left behind by the kill
    project.path("SLOW_f").unlink()
    # The real CLI takes over the dead apply's lock and plans only what is missing (answering
    # "no" at the prompt: this config is for recording providers, not real training).
    res = project.run("apply", input="no\n")
    assert "took over a stale apply lock" in res.stdout
    assert "Apply cancelled; nothing was changed." in res.stdout and res.returncode == 1
    planned = {line.split()[1] for line in res.stdout.splitlines() if line.strip().startswith("+")}
    assert planned == {"finetunes.f", "evals.e", "deployments.d"}


_INTERRUPT_SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r})
import engine_providers as ep
from llmops.apply import apply_plan
from llmops.planner import make_plan
from llmops.project import open_project
p = open_project(__import__("pathlib").Path({root!r}), provider_overrides=ep.OVERRIDES)
report = apply_plan(p, make_plan(p), parallelism=1)
print(json.dumps({{"interrupted": report.interrupted, "applied": report.applied,
                  "failed": report.failed, "skipped": report.skipped}}))
"""


def test_ctrl_c_stops_launching_work_and_keeps_the_lock_consistent(project):
    project.write({"llmops.yaml": CONFIG, "data/a.jsonl": '{"question": "a"}\n',
                   "data/b.jsonl": '{"question": "b"}\n', "SLOW_m": ""})
    script = _INTERRUPT_SCRIPT.format(tests=str(Path(__file__).parent), root=str(project.root))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    lock_path = project.path("llmops.lock")
    deadline = time.time() + 60
    while time.time() < deadline:
        if lock_path.exists() and "prompts.p" in load_lock(lock_path).resources:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # base_models.m is running now
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["interrupted"] is True
    assert report["failed"] == {"base_models.m": "base_models.m: cancelled"}
    assert {"finetunes.f", "evals.e", "deployments.d"} <= set(report["skipped"])
    lock = load_lock(lock_path)
    assert set(lock.resources) == set(report["applied"]) == {"datasets.a", "datasets.b", "prompts.p"}
