"""The engine at scale: the lock's journal (one fsynced line per finished resource, replayed
after a kill, bound to the lock it extends), the incrementally sorted lock, and the scheduler's
dependency counters. Real engine and CLI with the recording providers of engine_providers.py."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import engine_providers as ep
from llmops.engine.apply import ApplyHooks, apply_plan
from llmops.engine.applylock import ApplyLock
from llmops.errors import LockfileError
from llmops.engine.lockfile import (Lock, LockedResource, LockJournal, compact_journal, journal_path, load_lock,
                             save_lock)
from llmops.engine.planner import make_plan
from llmops.engine.project import open_project

from test_engine import CONFIG

ALL = {"datasets.a", "datasets.b", "prompts.p", "base_models.m", "finetunes.f", "evals.e", "deployments.d"}


@pytest.fixture
def proj(project):
    ep.reset()
    project.write({"llmops.yaml": CONFIG, "data/a.jsonl": '{"question": "a"}\n', "data/b.jsonl": '{"question": "b"}\n'})
    return project


def opened(project):
    return open_project(project.root, provider_overrides=ep.OVERRIDES)


def apply_all(project, **kw):
    p = opened(project)
    return apply_plan(p, make_plan(p), **kw)


def planned(res) -> set[str]:
    return {line.split()[1] for line in res.stdout.splitlines() if line.strip().startswith("+")}


# --- the scheduler: dependency counters and a ready queue in plan order ---------------------

class Events(ApplyHooks):
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def pre_apply(self, change) -> None:
        self.events.append(("start", change.address))

    def post_apply(self, change, error) -> None:
        self.events.append(("end" if error is None else "fail", change.address))

    def skipped(self, address, reason) -> None:
        self.events.append(("skip", address))


def test_one_at_a_time_runs_in_plan_order(proj):
    p = opened(proj)
    plan = make_plan(p)
    hooks = Events()
    assert apply_plan(p, plan, hooks=hooks, parallelism=1).ok
    assert [a for what, a in hooks.events if what == "start"] == [c.address for c in plan.changes]


@pytest.mark.parametrize("parallelism", [2, 3, 8])
def test_in_parallel_each_resource_starts_after_its_upstreams_ended(proj, parallelism, monkeypatch):
    monkeypatch.setattr(ep, "DWELL", 0.05)  # long enough for independent applies to overlap
    p = opened(proj)
    plan = make_plan(p)
    hooks = Events()
    assert apply_plan(p, plan, hooks=hooks, parallelism=parallelism).ok
    ended = {a: i for i, (what, a) in enumerate(hooks.events) if what == "end"}
    started = {a: i for i, (what, a) in enumerate(hooks.events) if what == "start"}
    assert set(started) == set(ended) == ALL
    for c in plan.changes:
        for up in c.depends_on:
            assert ended[up] < started[c.address], (up, c.address)
    assert 1 < ep.max_concurrency() <= parallelism  # the two datasets and the prompt are independent


def test_a_failure_skips_exactly_its_downstream_and_keep_going_runs_the_rest(proj):
    proj.write({"FAIL_m": ""})
    hooks = Events()
    report = apply_all(proj, hooks=hooks, parallelism=2, keep_going=True)
    assert set(report.failed) == {"base_models.m"}
    assert report.skipped == {a: "upstream base_models.m failed" for a in ("finetunes.f", "evals.e", "deployments.d")}
    assert set(report.applied) == {"datasets.a", "datasets.b", "prompts.p"}
    assert set(load_lock(proj.path("llmops.lock")).resources) == {"datasets.a", "datasets.b", "prompts.p"}


# --- the lock: written whole once per apply, then journaled ---------------------------------

class LockWrites(ApplyHooks):
    """Inode of llmops.lock after each recorded success (each whole write replaces the file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.inodes: list[int] = []
        self.journal_lines: list[int] = []

    def recorded(self, change, outputs, summary="") -> None:
        self.inodes.append(self.path.stat().st_ino)
        self.journal_lines.append(len(journal_path(self.path).read_bytes().splitlines()))


def test_an_apply_writes_the_lock_whole_once_then_one_journal_line_per_resource(proj):
    hooks = LockWrites(proj.path("llmops.lock"))
    assert apply_all(proj, hooks=hooks, parallelism=1).ok
    assert len(set(hooks.inodes)) == 1  # the first success wrote the file; the others did not
    assert hooks.journal_lines == list(range(1, 8))  # header, then one line per later success
    assert not journal_path(proj.path("llmops.lock")).exists()  # folded into the lock at the end
    # The same bytes as writing the whole lock from scratch.
    lock = load_lock(proj.path("llmops.lock"))
    fresh = Lock()
    for entry in lock.resources.values():
        fresh.set(entry)
    assert proj.read("llmops.lock") == fresh.dumps() and set(lock.resources) == ALL


def test_a_value_json_cannot_carry_exactly_is_written_into_the_lock_whole(tmp_path):
    path = tmp_path / "llmops.lock"
    journal = LockJournal(Lock(), path)
    journal.set(LockedResource("datasets.a", "sha256:1"))
    journal.set(LockedResource("datasets.b", "sha256:2", outputs={"counts": {1: 2}}))  # an int key
    assert "datasets.b" in path.read_text()  # in the file itself, not only in the journal
    journal.set(LockedResource("datasets.c", "sha256:3"))
    assert "datasets.c" not in path.read_text() and set(load_lock(path).resources) == {
        "datasets.a", "datasets.b", "datasets.c"}
    journal.close()
    assert load_lock(path).resources["datasets.b"].outputs == {"counts": {1: 2}}
    assert not journal_path(path).exists()


def test_sorted_order_is_kept_as_entries_come_and_go():
    addrs = [f"{kind}.n{i:03d}" for kind in ("deployments", "datasets", "evals", "prompts") for i in range(60)]
    rng = random.Random(7)
    lock = Lock()
    lock.set(LockedResource("finetunes.first", "sha256:0"))
    lock.dumps()  # builds the order; the changes below keep it by bisection
    for addr in rng.sample(addrs, len(addrs)):
        lock.set(LockedResource(addr, "sha256:0"))
    for addr in rng.sample(addrs, 50):
        lock.remove(addr)
    lock.set(LockedResource(addrs[0], "sha256:1"))  # again, after its removal or as an update
    rebuilt = Lock(resources=dict(lock.resources))  # sorted from scratch
    assert lock.dumps() == rebuilt.dumps()
    assert lock.addresses() == rebuilt.addresses() and len(lock.addresses()) == len(lock.resources)


# --- a killed apply: nothing that finished is lost ------------------------------------------

_APPLY_SCRIPT = r"""
import sys
sys.path.insert(0, {tests!r})
import engine_providers as ep
from llmops.engine.apply import apply_plan
from llmops.engine.applylock import ApplyLock
from llmops.engine.planner import make_plan
from llmops.engine.project import open_project
p = open_project(__import__("pathlib").Path({root!r}), provider_overrides=ep.OVERRIDES)
with ApplyLock.for_project(p):
    apply_plan(p, make_plan(p), parallelism=1)
"""


def _kill_while_f_runs(project) -> None:
    """Apply in a subprocess, SIGKILL it while finetunes.f runs (all of its upstreams finished)."""
    project.write({"SLOW_f": ""})
    script = _APPLY_SCRIPT.format(tests=str(Path(__file__).parent), root=str(project.root))
    proc = subprocess.Popen([sys.executable, "-c", script])
    lock_path = project.path("llmops.lock")
    deadline = time.time() + 60
    while time.time() < deadline and ("base_models.m" not in load_lock(lock_path).resources):
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    project.path("SLOW_f").unlink()


def test_a_killed_apply_is_replayed_by_plan_and_lock_check_and_folded_in_by_the_next_apply(proj, tmp_path):
    _kill_while_f_runs(proj)
    lock_path, journal = proj.path("llmops.lock"), journal_path(proj.path("llmops.lock"))
    done = {"datasets.a", "datasets.b", "prompts.p", "base_models.m"}
    assert journal.exists() and "base_models.m" not in proj.read("llmops.lock")  # only in the journal
    assert set(load_lock(lock_path).resources) == done

    res = proj.run("plan", "--refresh=false")
    assert res.returncode in (0, 2), res.stderr
    assert planned(res) == {"finetunes.f", "evals.e", "deployments.d"}
    res = proj.run("lock", "--check")
    assert res.returncode == 1 and "finetunes.f" in res.stderr and "datasets.a" not in res.stderr

    # Taking the apply lock folds the journal in, even when the apply then changes nothing.
    res = proj.run("apply", input="no\n")
    assert "took over a stale apply lock" in res.stdout and "Apply cancelled" in res.stdout
    assert not journal.exists() and set(yaml_resources(lock_path)) == done

    assert apply_all(proj).ok and set(ep.CALLS) == {(a, "create") for a in ("finetunes.f", "evals.e", "deployments.d")}
    # The resumed lock has the bytes of an apply that was never interrupted.
    other = tmp_path / "unbroken"
    (other / "data").mkdir(parents=True)
    for rel in ("llmops.yaml", "data/a.jsonl", "data/b.jsonl"):
        (other / rel).write_text(proj.read(rel))
    p = open_project(other, provider_overrides=ep.OVERRIDES)
    assert apply_plan(p, make_plan(p)).ok
    assert proj.read("llmops.lock") == (other / "llmops.lock").read_text()


def yaml_resources(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())["resources"]


def test_the_next_engine_apply_resumes_from_the_journal(proj):
    _kill_while_f_runs(proj)
    ep.reset()
    p = opened(proj)
    with ApplyLock.for_project(p):
        report = apply_plan(p, make_plan(p))
    assert report.ok and set(report.applied) == {"finetunes.f", "evals.e", "deployments.d"}
    assert set(yaml_resources(proj.path("llmops.lock"))) == ALL
    assert not journal_path(proj.path("llmops.lock")).exists()


# --- the journal is bound to the lock it extends --------------------------------------------

_JOURNAL_SCRIPT = r"""
import os, signal, sys
from pathlib import Path
from llmops.engine.lockfile import LockedResource, LockJournal, load_lock
path = Path(sys.argv[1])
journal = LockJournal(load_lock(path), path)
journal.set(LockedResource("datasets.a", "sha256:1"))  # a whole write, then the journal starts
journal.set(LockedResource("datasets.b", "sha256:2"))
journal.set(LockedResource("prompts.p", "sha256:3"))
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
journal.close()
"""


def _journal_of(path: Path, end: str = "kill") -> None:
    """Record three changes on top of the lock at `path`, then die by SIGKILL (or close)."""
    code = subprocess.run([sys.executable, "-c", _JOURNAL_SCRIPT, str(path), end]).returncode
    assert code == (-signal.SIGKILL if end == "kill" else 0)


def test_a_journal_for_another_lock_is_refused_with_what_to_do(proj):
    path = proj.path("llmops.lock")
    _journal_of(path)
    assert set(load_lock(path).resources) == {"datasets.a", "datasets.b", "prompts.p"}
    other = Lock()
    other.set(LockedResource("datasets.z", "sha256:9"))
    path.write_text(other.dumps())  # the lock changed under the journal (a git checkout, a pull)
    with pytest.raises(LockfileError) as info:
        load_lock(path)
    msg = info.value.message
    assert "2 resource(s) (datasets.b, prompts.p)" in msg and "another llmops.lock" in msg
    assert f"rm {journal_path(path)}" in msg
    res = proj.run("plan", "--refresh=false")
    assert res.returncode == 1 and "another llmops.lock" in res.stdout + res.stderr
    with pytest.raises(LockfileError):
        compact_journal(path)  # the next apply refuses it too, and keeps it for the user to decide
    assert journal_path(path).exists() and path.read_text() == other.dumps()
    journal_path(path).unlink()
    assert set(load_lock(path).resources) == {"datasets.z"}


def test_a_journal_already_folded_into_the_lock_is_ignored(proj):
    path = proj.path("llmops.lock")
    _journal_of(path)
    kept = journal_path(path).read_bytes()
    _journal_of(path, end="close")  # an apply that finished: the lock holds all three
    text = path.read_text()
    # As a kill between replacing the lock and deleting the journal leaves it.
    digest = hashlib.sha256(text.encode()).hexdigest()
    journal_path(path).write_bytes(kept + json.dumps({"op": "compacted", "digest": digest}).encode() + b"\n")
    assert set(load_lock(path).resources) == {"datasets.a", "datasets.b", "prompts.p"}
    assert load_lock(path).digest() == digest
    assert compact_journal(path) and path.read_text() == text and not journal_path(path).exists()


def test_a_line_cut_short_by_a_kill_is_not_a_change_and_a_corrupt_one_is_refused(proj):
    path = proj.path("llmops.lock")
    _journal_of(path)
    good = journal_path(path).read_bytes()
    journal_path(path).write_bytes(good + b'{"op": "set", "address": "evals.e", "ent')
    assert set(load_lock(path).resources) == {"datasets.a", "datasets.b", "prompts.p"}
    journal_path(path).write_bytes(good.replace(b'"prompts.p"', b'"prompts.p', 1))
    with pytest.raises(LockfileError, match=r"llmops.lock.journal:3: the apply journal is corrupt.*rm "):
        load_lock(path)
    journal_path(path).write_bytes(good.replace(b'"prompts.p"', b'"prompts/../../x"', 1))
    with pytest.raises(LockfileError, match="is not a resource address"):
        load_lock(path)
    # A journal that holds no change (killed right after it started) has nothing to refuse.
    journal_path(path).write_bytes(good.splitlines(keepends=True)[0].replace(b'"base": "', b'"base": "0', 1))
    assert set(load_lock(path).resources) == {"datasets.a"}


def test_a_saved_lock_supersedes_the_journal(proj):
    path = proj.path("llmops.lock")
    _journal_of(path)
    lock = load_lock(path)  # what rollback/down load, with the journal replayed
    lock.set(LockedResource("deployments.d", "sha256:4"))
    save_lock(lock, path)
    assert not journal_path(path).exists()
    assert set(yaml_resources(path)) == {"datasets.a", "datasets.b", "prompts.p", "deployments.d"}
