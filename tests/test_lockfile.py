"""llmops.lock: golden bytes, stability, atomic writes, clear errors on bad files."""

from __future__ import annotations

import pytest

from llmops.errors import LockfileError
from llmops.engine.lockfile import Lock, LockedResource, load_lock, save_lock

GOLDEN = """\
# llmops.lock: maintained by llmops; do not edit by hand.
# It records what `llmops apply` last did. Commit it with llmops.yaml.
lock_version: 1
resources:

  datasets.tickets:
    files:
      data/tickets.jsonl: 0123456789abcdef0123456789abcdef
    fingerprint: sha256:aa
    inputs: {}
    outputs:
      train:
        md5: ffff
        rows: 200
    spec:
      source: data/tickets.jsonl
    upstreams: {}

  finetunes.lora:
    files: {}
    fingerprint: sha256:bb
    inputs: {}
    outputs:
      metrics:
        eval_loss: 1.25
    spec:
      training:
        learning_rate: 0.0002
    upstreams:
      datasets.tickets: sha256:aa
"""


def sample() -> Lock:
    lock = Lock()
    # Inserted in reverse order: output order is by kind then name.
    lock.set(LockedResource("finetunes.lora", "sha256:bb", spec={"training": {"learning_rate": 2e-4}},
                            upstreams={"datasets.tickets": "sha256:aa"}, outputs={"metrics": {"eval_loss": 1.25}}))
    lock.set(LockedResource("datasets.tickets", "sha256:aa", spec={"source": "data/tickets.jsonl"},
                            files={"data/tickets.jsonl": "0123456789abcdef0123456789abcdef"},
                            outputs={"train": {"rows": 200, "md5": "ffff"}}))
    return lock


def test_golden_bytes_and_round_trip(tmp_path):
    path = tmp_path / "llmops.lock"
    save_lock(sample(), path)
    assert path.read_text() == GOLDEN
    again = load_lock(path)
    save_lock(again, path)
    assert path.read_text() == GOLDEN
    assert again.resources["finetunes.lora"].spec["training"]["learning_rate"] == 2e-4


def test_empty_and_missing(tmp_path):
    assert load_lock(tmp_path / "nope.lock").resources == {}
    save_lock(Lock(), tmp_path / "l")
    assert (tmp_path / "l").read_text().endswith("lock_version: 1\nresources: {}\n")


def test_cached_blocks_follow_updates(tmp_path):
    lock = sample()
    first = lock.dumps()
    entry = lock.get("datasets.tickets")
    lock.set(LockedResource(entry.address, "sha256:cc", spec=entry.spec))
    assert "sha256:cc" in lock.dumps() and lock.dumps() != first
    lock.remove("datasets.tickets")
    assert "\n  datasets.tickets:\n" not in lock.dumps() and "\n  finetunes.lora:\n" in lock.dumps()


@pytest.mark.parametrize("text,match", [
    ("lock_version: 1\nresources: {a: [1\n", r"llmops.lock:\d+:\d+: the lockfile is corrupt.*git checkout -- llmops.lock"),
    ("just text\n", "not an llmops lockfile"),
    ("lock_version: 9\nresources: {}\n", r"newer llmops \(lock_version 9.*Upgrade llmops"),
    ("lock_version: 1\nresources: {datasets.a: {spec: {}}}\n", "entry 'datasets.a' has no fingerprint"),
    ("lock_version: 1\nresources: {datasets.a: {fingerprint: x, outputs: [1]}}\n", "`outputs` must be a mapping"),
])
def test_bad_lockfiles_get_a_way_out(tmp_path, text, match):
    path = tmp_path / "llmops.lock"
    path.write_text(text)
    with pytest.raises(LockfileError, match=match):
        load_lock(path)


def test_write_is_atomic_no_temp_files_left(tmp_path):
    path = tmp_path / "llmops.lock"
    for _ in range(3):
        save_lock(sample(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llmops.lock"]


def test_two_branches_changing_different_resources_merge_cleanly(tmp_path):
    import subprocess

    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True, text=True)  # noqa: E731
    git("init", "-q", "-b", "main")
    base = sample()
    for name in ("a", "b", "c"):
        base.set(LockedResource(f"prompts.{name}", "sha256:0", spec={"text": name}))
    save_lock(base, repo / "llmops.lock")
    git("add", ".")
    git("commit", "-qm", "base")
    git("checkout", "-qb", "one")
    lock = load_lock(repo / "llmops.lock")
    lock.set(LockedResource("prompts.a", "sha256:1", spec={"text": "a2"}))
    save_lock(lock, repo / "llmops.lock")
    git("commit", "-qam", "one")
    git("checkout", "-q", "main")
    git("checkout", "-qb", "two")
    lock = load_lock(repo / "llmops.lock")
    lock.set(LockedResource("prompts.c", "sha256:2", spec={"text": "c2"}))
    lock.set(LockedResource("datasets.new", "sha256:3", spec={"source": "x"}))
    save_lock(lock, repo / "llmops.lock")
    git("commit", "-qam", "two")
    git("merge", "-q", "one", "-m", "merge")
    merged = load_lock(repo / "llmops.lock")
    assert merged.resources["prompts.a"].fingerprint == "sha256:1"
    assert merged.resources["prompts.c"].fingerprint == "sha256:2"
    assert "datasets.new" in merged.resources


@pytest.mark.parametrize("text, needle", [
    ("lock_version: 1\nresources:\n  finetunes.../../../../victim: {fingerprint: 'sha256:0000'}\n",
     "is not a resource address"),
    ("lock_version: 1\nresources:\n  finetunes.a: {fingerprint: x}\n  finetunes.a: {fingerprint: y}\n",
     "duplicate key 'finetunes.a'"),
    ("- 1\n- 2\n", "not an llmops lockfile"),
    ("a: &a [x, x]\nb: [*a, *a]\nlock_version: 1\n", "anchors or aliases"),
    ("lock_version: 1\nresources:\n  1: {fingerprint: x}\n", "must be a string"),
    ("lock_version: 1\nresources:\n  finetunes.a: {fingerprint: x, files: [1]}\n", "`files` must be a mapping"),
    ("lock_version: 1\nresources:\n  finetunes.a: {fingerprint: x, upstreams: {../x: y}}\n", "upstream '../x'"),
    ("lock_version: 1\nresources: !foo {}\n", "tag '!foo'"),
])
def test_hostile_lock_is_refused_with_how_to_recover(tmp_path, text, needle) -> None:
    path = tmp_path / "llmops.lock"
    path.write_text(text)
    with pytest.raises(LockfileError) as info:
        load_lock(path)
    assert needle in info.value.message
    assert str(path) in info.value.message and "git checkout" in info.value.message
