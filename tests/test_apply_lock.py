"""One apply at a time: a kernel lock per checkout, a registry lease across checkouts sharing a
tracking server; a SIGKILLed apply leaves a loadable lock and the next one resumes."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmops.engine.applylock import ApplyLock, force_unlock, parse_duration, read_apply_lock
from llmops.errors import ApplyLockedError, LlmopsError, ProviderError
from llmops.engine.lockfile import load_lock

from conftest import Project
from test_engine import CONFIG

# A process that takes the local lock of state folder argv[1], prints its ID, holds it argv[2]
# seconds, releases it, prints "released" and lives on (so only the release frees the lock).
_HOLDER = r"""
import sys, time
from pathlib import Path
from llmops.engine.applylock import ApplyLock
lock = ApplyLock(Path(sys.argv[1]))
lock.acquire()
print(lock.info.id, flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
print("released", flush=True)
time.sleep(60)
"""


def _hold(state_dir: Path, seconds: float = 60.0) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(state_dir), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("text, seconds", [
    ("0", 0.0), ("45", 45.0), ("30s", 30.0), ("2m", 120.0), ("1m30s", 90.0), ("1h", 3600.0),
    ("500ms", 0.5), ("1.5s", 1.5),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5 minutes", "-1s", "2d", "s"])
def test_parse_duration_refuses_what_is_not_a_duration(text):
    with pytest.raises(LlmopsError, match="not a duration; use e.g. 0, 30s, 2m"):
        parse_duration(text)


def test_second_apply_fails_naming_the_holder(tmp_path):
    with ApplyLock(tmp_path) as first:
        with pytest.raises(ApplyLockedError) as info:
            ApplyLock(tmp_path).acquire()
        msg = info.value.message
        assert f"pid {os.getpid()} on {socket.gethostname()}" in msg and first.info.id in msg
        assert first.info.started in msg and "--lock-timeout" in msg and f"kill {os.getpid()}" in msg
    assert read_apply_lock(tmp_path) is None  # a clean release empties the file
    assert (tmp_path / "apply.lock").exists()  # and never deletes it (see the module docstring)


def test_sigkilled_holder_leaves_a_lock_the_next_apply_takes(tmp_path):
    proc, lock_id = _hold(tmp_path)
    with pytest.raises(ApplyLockedError, match=f"pid {proc.pid} .*lock ID {lock_id}"):
        ApplyLock(tmp_path).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_apply_lock(tmp_path).id == lock_id  # its record stays; the kernel dropped its lock
    with ApplyLock(tmp_path) as lock:
        assert lock.took_over is not None and (lock.took_over.id, lock.took_over.pid) == (lock_id, proc.pid)
        assert read_apply_lock(tmp_path).id == lock.info.id


@pytest.mark.parametrize("text", ["", "garbage{", "{}", "[1, 2]", '{"id": "x"}', "\x00\x00"])
def test_an_empty_or_corrupt_lock_file_is_taken(tmp_path, text):
    (tmp_path / "apply.lock").write_text(text)
    with ApplyLock(tmp_path) as lock:
        assert lock.took_over is None
        assert read_apply_lock(tmp_path).id == lock.info.id


def test_a_record_from_another_host_is_taken_when_nobody_holds_the_kernel_lock(tmp_path):
    (tmp_path / "apply.lock").write_text(json.dumps(
        {"id": "abc123", "pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00"}))
    with ApplyLock(tmp_path) as lock:
        assert lock.took_over.describe() == "pid 1 on elsewhere, started 2026-01-01T00:00:00 (lock ID abc123)"


def test_force_unlock_checks_the_id_and_clears_a_dead_holders_record(tmp_path):
    (tmp_path / "apply.lock").write_text(json.dumps(
        {"id": "abc123", "pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(LlmopsError, match="ID is abc123, not nope"):
        force_unlock(tmp_path, "nope")
    assert force_unlock(tmp_path, "abc123").host == "elsewhere"
    assert read_apply_lock(tmp_path) is None
    with pytest.raises(LlmopsError, match="no apply lock"):
        force_unlock(tmp_path, "abc123")


def test_force_unlock_refuses_a_holder_that_is_still_running(tmp_path):
    proc, lock_id = _hold(tmp_path)
    try:
        with pytest.raises(LlmopsError, match=f"still running .*kill {proc.pid}"):
            force_unlock(tmp_path, lock_id)
        with pytest.raises(ApplyLockedError):
            ApplyLock(tmp_path).acquire()
    finally:
        _stop(proc)


def test_lock_timeout_waits_for_the_holder_to_release(tmp_path):
    proc, _ = _hold(tmp_path, seconds=0.5)
    try:
        with ApplyLock(tmp_path, timeout=60) as lock:
            assert proc.stdout.readline().strip() == "released"  # it got the lock only after that
            assert lock.took_over is None  # a clean release, not a death
    finally:
        _stop(proc)


def test_lock_timeout_refuses_after_the_deadline(tmp_path):
    proc, lock_id = _hold(tmp_path)
    try:
        with pytest.raises(ApplyLockedError, match=rf"\(waited 0.5s\): pid {proc.pid} .*lock ID {lock_id}"):
            ApplyLock(tmp_path, timeout=0.5).acquire()
    finally:
        _stop(proc)


def test_apply_lock_timeout_option(project):
    project.write({"llmops.yaml": CONFIG, "data/a.jsonl": '{"question": "a"}\n',
                   "data/b.jsonl": '{"question": "b"}\n'})
    res = project.run("apply", "--lock-timeout", "soon")
    assert res.returncode == 1 and "'soon' is not a duration" in res.stderr
    proc, lock_id = _hold(project.path(".llmops"))
    try:
        res = project.run("apply", "--lock-timeout", "500ms", "--auto-approve")
        assert res.returncode == 1, res.stdout + res.stderr
        assert f"(waited 0.5s): pid {proc.pid}" in res.stderr and f"lock ID {lock_id}" in res.stderr
    finally:
        _stop(proc)


# Each of two racers, per line on stdin: take the lock (timeout 0), check nobody else holds it
# (an O_EXCL sentinel only a holder creates), hold briefly, release, report on stdout.
_RACER = r"""
import json, os, sys, time
from pathlib import Path
from llmops.engine.applylock import ApplyLock
from llmops.errors import ApplyLockedError
state, sentinel = Path(sys.argv[1]), Path(sys.argv[2])
while sys.stdin.readline():
    lock = ApplyLock(state)
    try:
        lock.acquire()
    except ApplyLockedError:
        print(json.dumps({"won": False}), flush=True)
        continue
    try:
        os.close(os.open(sentinel, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        overlap = False
    except FileExistsError:
        overlap = True
    time.sleep(0.002)
    if not overlap:
        os.unlink(sentinel)
    took = lock.took_over.id if lock.took_over else None
    lock.release()
    print(json.dumps({"won": True, "overlap": overlap, "took_over": took}), flush=True)
"""


def test_two_processes_racing_for_a_dead_holders_lock_never_both_hold_it(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), str(tmp_path / "held")],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for trial in range(200):
            (tmp_path / "apply.lock").write_text(json.dumps(
                {"id": f"dead{trial}", "pid": dead.pid, "host": socket.gethostname(), "started": "?"}))
            for racer in racers:  # both wake at once from their blocking read
                racer.stdin.write("go\n")
                racer.stdin.flush()
            results = [json.loads(racer.stdout.readline()) for racer in racers]
            assert any(r["won"] for r in results), (trial, results)
            assert not any(r.get("overlap") for r in results), (trial, results)
            # Exactly one of them found the dead holder's record; a second winner came after a release.
            assert [r.get("took_over") for r in results if r.get("took_over")] == [f"dead{trial}"], (trial, results)
    finally:
        for racer in racers:
            racer.stdin.close()
            racer.wait(timeout=30)


_APPLY_SCRIPT = r"""
import sys
sys.path.insert(0, {tests!r})
import engine_providers as ep
from llmops.engine.apply import apply_plan
from llmops.engine.applylock import ApplyLock
from llmops.engine.planner import make_plan
from llmops.engine.project import open_project
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
import json, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job inherits SIGINT ignored
sys.path.insert(0, {tests!r})
import engine_providers as ep
from llmops.engine.apply import apply_plan
from llmops.engine.planner import make_plan
from llmops.engine.project import open_project
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


# -- the shared lease, against a real `mlflow server` on loopback -------------------------------

@pytest.fixture(scope="module")
def lock_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend (its own; not conftest's), on a
    copy of the session's prepared empty store: the server skips MLflow's schema migrations."""
    from conftest import copy_prepared_mlflow_db
    from services import mlflow_server

    folder = tmp_path_factory.mktemp("lock-server")
    db = copy_prepared_mlflow_db(folder / "mlflow.db", folder / "artifacts")
    with mlflow_server(f"sqlite:///{db}", folder / "artifacts", log_file=folder / "server.log") as url:
        yield url


def _checkouts(tmp_path: Path, url: str, project: str) -> tuple[Path, Path]:
    """Two folders of the same project (two checkouts) sharing the tracking server at `url`."""
    roots = (tmp_path / "checkout-a", tmp_path / "checkout-b")
    for root in roots:
        root.mkdir()
        (root / "llmops.yaml").write_text(f'version: 1\nproject: {project}\nsettings: {{tracking_uri: "{url}"}}\n')
    return roots


def _lock(root: Path, **kwargs) -> ApplyLock:
    from llmops.engine.project import open_project

    return ApplyLock.for_project(open_project(root), **kwargs)


def _lease_names(url: str, project: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri=url, registry_uri=url).search_registered_models(
        filter_string=f"name LIKE 'llmops-apply-lock.{project}.%'")
    return sorted(m.name for m in found)


def test_a_local_tracking_store_needs_no_shared_lease(tmp_path):
    (tmp_path / "llmops.yaml").write_text("version: 1\nproject: p\n")
    assert _lock(tmp_path).shared is None


def test_an_unreachable_tracking_server_fails_fast_naming_it(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    a, _ = _checkouts(tmp_path, f"http://127.0.0.1:{port}", "gone")
    lock = _lock(a)
    with pytest.raises(ProviderError, match=f"http://127.0.0.1:{port}.*start it or fix settings.tracking_uri"):
        lock.acquire()
    assert read_apply_lock(a / ".llmops") is None  # the local lock was given back
    ApplyLock(a / ".llmops").acquire()


def test_two_checkouts_of_a_shared_project_apply_one_at_a_time(tmp_path, lock_server):
    a, b = _checkouts(tmp_path, lock_server, "serial")
    first = _lock(a)
    with first:
        assert first.shared is not None and first.shared.uri == lock_server
        with pytest.raises(ApplyLockedError) as refused:
            _lock(b).acquire()
        msg = refused.value.message
        assert f"shared apply lock of project 'serial' in {lock_server}" in msg
        assert f"pid {os.getpid()} on {socket.gethostname()}, started {first.info.started}" in msg
        assert f"`llmops force-unlock {first.info.id}`" in msg
        assert read_apply_lock(b / ".llmops") is None  # b gave its local lock back
    assert _lease_names(lock_server, "serial") == []  # release deleted the lease
    with _lock(b) as second:
        assert second.took_over is None  # a clean release
        assert len(_lease_names(lock_server, "serial")) == 1


def test_force_unlock_removes_the_shared_lease_by_id(tmp_path, lock_server):
    a, b = _checkouts(tmp_path, lock_server, "forced")
    first = _lock(a, renew_every=0.2)
    first.acquire()
    # The real CLI from the other checkout. Refusing a wrong ID, in this interpreter (the lease
    # lives in the server); removing it, in another process, so that the pid it names is the
    # holder's and not its own.
    elsewhere = Project(tmp_path)  # run from outside both checkouts: -C picks b
    res = elsewhere.run("force-unlock", "-C", str(b), "nope")
    assert res.returncode == 1 and f"ID is {first.info.id}, not nope" in res.stderr
    res = elsewhere.run("force-unlock", "-C", str(b), first.info.id, subprocess=True)
    assert res.returncode == 0, res.stderr
    assert f"Removed the apply lock held by pid {os.getpid()}" in res.stdout
    with _lock(b) as second:
        deadline = time.time() + 30
        while first.lost is None and time.time() < deadline:
            time.sleep(0.1)
        assert "was removed" in first.lost or "another apply" in first.lost
        first.release()  # must not delete b's lease, even when it reuses the generation's name
        with pytest.raises(ApplyLockedError, match=f"lock ID {second.info.id}"):
            _lock(a).acquire()


# A holder in checkout argv[1] with a lease of argv[2] seconds, renewed often; SIGKILLed by the test.
_LEASE_HOLDER = r"""
import sys, time
from pathlib import Path
from llmops.engine.applylock import ApplyLock
from llmops.engine.project import open_project
lock = ApplyLock.for_project(open_project(Path(sys.argv[1])), lease_ttl=float(sys.argv[2]), renew_every=0.25)
lock.acquire()
print(lock.info.id, flush=True)
time.sleep(120)
"""


def test_a_lease_is_renewed_while_held_and_taken_over_once_expired(tmp_path, lock_server):
    a, b = _checkouts(tmp_path, lock_server, "expiry")
    ttl = 1.5  # its renewals every 0.25 s leave 1.25 s for a slow round trip on a loaded machine
    proc = subprocess.Popen([sys.executable, "-c", _LEASE_HOLDER, str(a), str(ttl)], stdout=subprocess.PIPE,
                            text=True)
    try:
        lock_id = proc.stdout.readline().strip()
        assert lock_id, "the holder did not take the lock"
        time.sleep(ttl + 0.5)  # past the TTL it took the lease with: only renewals keep it
        with pytest.raises(ApplyLockedError, match=f"pid {proc.pid} .*lock ID {lock_id}"):
            _lock(b).acquire()
        old = _lease_names(lock_server, "expiry")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with _lock(b, timeout=60) as taker:  # waits for the dead holder's lease to lapse
        assert taker.took_over is not None and (taker.took_over.id, taker.took_over.pid) == (lock_id, proc.pid)
        names = _lease_names(lock_server, "expiry")
        assert len(names) == 1 and names != old  # a new generation; the expired one is deleted


def test_racing_takers_of_a_shared_lease_never_both_hold_it(tmp_path, lock_server):
    roots = _checkouts(tmp_path, lock_server, "race")
    barrier = threading.Barrier(2)
    for trial in range(30):
        locks = [_lock(root) for root in roots]
        won: list[bool] = [False, False]

        def take(i: int) -> None:
            barrier.wait()
            try:
                locks[i].acquire()
                won[i] = True
            except ApplyLockedError:
                pass
            barrier.wait()  # both have tried before either releases

        threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert won.count(True) == 1, (trial, won)
        for lock in locks:
            lock.release()


def _watch_opens(path: Path) -> int | None:
    """An inotify fd that turns readable once a process opens `path` (IN_OPEN) after this call;
    None where inotify is not available."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, AttributeError):
        return None
    if fd < 0:
        return None
    if libc.inotify_add_watch(fd, os.fsencode(path), 0x20) < 0:  # IN_OPEN
        os.close(fd)
        return None
    return fd


def test_an_apply_that_waited_for_the_lock_plans_from_the_lock_the_other_left(project):
    """`--lock-timeout`: the waiting apply opened llmops.lock before the holder finished; once it
    holds the lock it reads the lock again, so it neither plans from nor saves over a stale one."""
    from llmops.engine.lockfile import save_lock

    project.write({"llmops.yaml": "version: 1\nproject: race\ndatasets:\n  a: {source: data/a.jsonl}\n"
                                  "  b: {source: data/b.jsonl}\n",
                   "data/a.jsonl": '{"question": "a"}\n', "data/b.jsonl": '{"question": "b"}\n'})
    assert project.run("apply", "--auto-approve").returncode == 0
    proc, _ = _hold(project.path(".llmops"), seconds=60)
    opens = _watch_opens(project.path(".llmops/apply.lock"))  # the holder opened it before this
    result: dict = {}
    waiter = threading.Thread(target=lambda: result.update(
        # A second CLI process, as in CI: not this interpreter's thread (cwd, streams, signals).
        res=project.run("apply", "--lock-timeout", "60s", "--auto-approve", subprocess=True)))
    try:
        waiter.start()
        # The waiter read llmops.lock (opening the project) before it first tries the apply lock.
        if opens is None:
            time.sleep(3.0)  # no inotify here: give it time to get that far
        else:
            assert select.select([opens], [], [], 120)[0], "the waiting apply never tried the apply lock"
        lock = load_lock(project.path("llmops.lock"))  # what the holder's apply leaves: datasets.b gone
        lock.remove("datasets.b")
        save_lock(lock, project.path("llmops.lock"))
    finally:
        _stop(proc)
        if opens is not None:
            os.close(opens)
    waiter.join(120)
    res = result["res"]
    assert res.returncode == 0, res.stdout + res.stderr
    assert "datasets.b" in res.stdout and "Apply complete: 1 applied." in res.stdout
    assert set(load_lock(project.path("llmops.lock")).resources) == {"datasets.a", "datasets.b"}
