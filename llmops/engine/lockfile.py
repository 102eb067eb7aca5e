"""llmops.lock: what was last applied, one entry per resource, pinned to content hashes.

Invariants:
- The file starts with a header comment, then `lock_version`, then `resources`.
- Resources are sorted by address (kind order, then name); keys inside are sorted.
- The same state always serialises to the same bytes.
- Writes go to a temp file in the same folder, are fsynced, then `os.replace`d: a crash
  leaves either the old or the new file, never a torn one.
- Each resource is one block separated by a blank line, so two branches that change
  different resources merge without conflict in git.

Serialisation is cached per resource block and the sorted address order is kept as entries
come and go (bisect), so a dump costs a string join, not a sort and a re-dump of every entry.

During an apply, each finished resource is recorded in a journal beside the lock instead of
rewriting the whole file (`LockJournal`): one fsynced JSON line per change, so the cost of
recording does not grow with the project. Journal invariants:
- It lives at `.llmops/llmops.lock.journal`; its first line names the sha256 of the
  llmops.lock text it extends (`base`), each later line is one change, written and fsynced
  before that change counts as recorded. A kill loses at most a line still being written.
- `load_lock` replays it onto the lock when `base` is the lock's digest, so `plan`,
  `lock --check` and the next apply see what a killed apply finished. A journal that extends
  another lock (the file changed since, e.g. by a git checkout) is refused with what to do,
  never applied to the wrong lock.
- `save_lock` writes the whole state, so it supersedes the journal: it appends a
  `compacted` line naming the digest it is about to write, replaces the lock, then deletes the
  journal. A kill in between leaves a journal that `load_lock` knows is already folded in.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmops.engine.addrs import address_problem, address_sort_key
from llmops.errors import LockfileError
from llmops.fsutil import atomic_write_text

LOCK_VERSION = 1
LOCK_NAME = "llmops.lock"
JOURNAL_NAME = "llmops.lock.journal"
JOURNAL_VERSION = 1
HEADER = (
    "# llmops.lock: maintained by llmops; do not edit by hand.\n"
    "# It records what `llmops apply` last did. Commit it with llmops.yaml.\n"
)

_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# The lock comes from git, so from anyone who can open a pull request: it is parsed as
# untrusted input. llmops never writes anchors, aliases or merge keys, nor two equal keys,
# so those are refused (an alias bomb would otherwise expand in the JSON parse cache).


class _LockDuplicateKey(yaml.constructor.ConstructorError):
    pass


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """Safe loader that refuses duplicate keys and aliases (llmops never writes either)."""

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise yaml.constructor.ConstructorError(
                    None, None, "merge keys (`<<:`) are not allowed in the lockfile", key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "mapping keys must be scalars", key_node.start_mark) from None
            if key in seen:
                raise _LockDuplicateKey(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen[key] = True
        return super().construct_mapping(node, deep=deep)

_ENTRY_KEYS = ("fingerprint", "spec", "files", "upstreams", "inputs", "outputs")


@dataclass
class LockedResource:
    """What was applied for one address.

    fingerprint: the resource's fingerprint when applied (see llmops.engine.fingerprint).
    spec: its canonical spec (cosmetic fields removed), kept to explain diffs.
    files: project-relative path -> md5 of every file input it read.
    upstreams: upstream address -> that upstream's fingerprint at apply time.
    inputs: resolved inputs (dataset md5s, base-model commit, image digest...).
    outputs: results (MLflow run id, model version, metrics, alias, endpoint...).
    """

    address: str
    fingerprint: str
    spec: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    upstreams: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _ENTRY_KEYS}


@dataclass
class Lock:
    """All lock entries of a project, keyed by address."""

    resources: dict[str, LockedResource] = field(default_factory=dict)
    _blocks: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    # Digest of the lock file's text while this lock is exactly that file (loaded or saved,
    # unmodified since, no journal replayed on top): saves a re-dump.
    _loaded_digest: str | None = field(default=None, repr=False, compare=False)
    # Addresses in output order and their sort keys, kept by set/remove once built.
    _order: list[str] | None = field(default=None, repr=False, compare=False)
    _keys: list[tuple[int, str]] = field(default_factory=list, repr=False, compare=False)

    def get(self, address: str) -> LockedResource | None:
        return self.resources.get(address)

    def set(self, entry: LockedResource) -> None:
        if entry.address not in self.resources and self._order is not None:
            key = address_sort_key(entry.address)
            i = bisect.bisect_left(self._keys, key)
            self._keys.insert(i, key)
            self._order.insert(i, entry.address)
        self.resources[entry.address] = entry
        self._blocks.pop(entry.address, None)
        self._loaded_digest = None

    def remove(self, address: str) -> None:
        if address in self.resources and self._order is not None:
            i = bisect.bisect_left(self._keys, address_sort_key(address))
            del self._keys[i], self._order[i]
        self.resources.pop(address, None)
        self._blocks.pop(address, None)
        self._loaded_digest = None

    def addresses(self) -> list[str]:
        """Addresses in lock order (kind order, then name); the list is the lock's own, do not change it."""
        if self._order is None or len(self._order) != len(self.resources):
            self._order = sorted(self.resources, key=address_sort_key)
            self._keys = [address_sort_key(a) for a in self._order]
        return self._order

    def dumps(self) -> str:
        parts = [HEADER, f"lock_version: {LOCK_VERSION}\n"]
        if not self.resources:
            parts.append("resources: {}\n")
            return "".join(parts)
        parts.append("resources:\n")
        for addr in self.addresses():
            block = self._blocks.get(addr)
            if block is None:
                block = _dump_block(self.resources[addr])
                self._blocks[addr] = block
            parts.append("\n")
            parts.append(block)
        return "".join(parts)

    def digest(self) -> str:
        if self._loaded_digest is not None:
            return self._loaded_digest
        return hashlib.sha256(self.dumps().encode()).hexdigest()


def _dump_block(entry: LockedResource) -> str:
    text = yaml.dump(
        {entry.address: entry.to_dict()},
        Dumper=_Dumper,
        sort_keys=True,
        default_flow_style=False,
        allow_unicode=True,
        width=100,
    )
    return "".join("  " + line + "\n" for line in text.splitlines())


def lock_path(root: Path) -> Path:
    return root / LOCK_NAME


def load_lock(path: Path) -> Lock:
    """Load and validate a lockfile, with the journal of an unfinished apply replayed onto it;
    a missing file is an empty lock."""
    # The journal is opened before the lock is read: if an apply compacts it meanwhile, this
    # open file still ends with the `compacted` line naming the lock that was then read.
    journal = _open_journal(path)
    try:
        lock = _load_file(path)
        if journal is not None:
            _replay(lock, path, _read_all(journal))
    finally:
        if journal is not None:
            os.close(journal)
    return lock


def _load_file(path: Path) -> Lock:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Lock()
    except OSError as exc:
        raise LockfileError(f"{path}: cannot read the lockfile ({exc.strerror}). Check that it is a readable "
                            "file.") from exc
    except UnicodeDecodeError as exc:
        raise LockfileError(f"{path}: the lockfile is not UTF-8 text ({exc.reason} at byte {exc.start}). "
                            f"Restore it from git (`git checkout -- {path.name}`), or delete it and run "
                            "`llmops apply` to rebuild it from scratch.") from None
    digest = hashlib.sha256(text.encode()).hexdigest()
    cached = _read_parse_cache(path, digest)
    if cached is not None:
        return _from_data(path, cached, digest)
    recover = (
        f"Restore it from git (`git checkout -- {path.name}`), or delete it and run "
        "`llmops apply` to rebuild it from scratch."
    )
    if _has_alias(text):
        raise LockfileError(f"{path}: the lockfile uses YAML anchors or aliases (`&`/`*`), which llmops never "
                            f"writes. {recover}")
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise LockfileError(f"{where}: the lockfile is corrupt ({getattr(exc, 'problem', exc)}). {recover}") from exc
    except RecursionError:
        data = _TOO_DEEP
    if data is _TOO_DEEP or _depth(data) > MAX_DEPTH:
        raise LockfileError(f"{path}: the lockfile nests deeper than {MAX_DEPTH} levels, which llmops never "
                            f"writes. {recover}")
    lock = _from_data(path, data, digest)
    _write_parse_cache(path, digest, data)
    return lock


MAX_DEPTH = 32  # an entry's outputs nest a few levels; the file itself adds three
_TOO_DEEP = object()


def _depth(value: Any, level: int = 0) -> int:
    """How deep `value` nests (stops counting past MAX_DEPTH)."""
    if level > MAX_DEPTH or not isinstance(value, (dict, list)):
        return level
    items = value.values() if isinstance(value, dict) else value
    return max((_depth(v, level + 1) for v in items), default=level + 1)


def _has_alias(text: str) -> bool:
    """Whether the YAML text has an anchor or alias token (checked before constructing)."""
    if "&" not in text and "*" not in text:
        return False
    try:
        for token in yaml.scan(text, Loader=_BaseLoader):
            if isinstance(token, (yaml.AliasToken, yaml.AnchorToken)):
                return True
    except yaml.YAMLError:
        return False  # reported by the parse that follows
    return False


def _from_data(path: Path, data: Any, digest: str) -> Lock:
    recover = (
        f"Restore it from git (`git checkout -- {path.name}`), or delete it and run "
        "`llmops apply` to rebuild it from scratch."
    )
    if not isinstance(data, dict) or "lock_version" not in data:
        raise LockfileError(f"{path}: not an llmops lockfile (no lock_version). {recover}")
    version = data["lock_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise LockfileError(f"{path}: lock_version must be an integer, found {version!r}. {recover}")
    if version > LOCK_VERSION:
        raise LockfileError(
            f"{path}: written by a newer llmops (lock_version {version}; this llmops reads up to "
            f"{LOCK_VERSION}). Upgrade llmops (`pip install -U llmops-gitops`) to use this project."
        )
    resources = data.get("resources") or {}
    if not isinstance(resources, dict):
        raise LockfileError(f"{path}: `resources` must be a mapping of address to entry. {recover}")
    lock = Lock()
    for addr, raw in resources.items():
        lock.resources[addr] = _entry(path, addr, raw, recover)
    lock._loaded_digest = digest
    return lock


def _entry(path: Path, addr: Any, raw: Any, recover: str) -> LockedResource:
    """One validated entry (of the lock or of its journal)."""
    problem = address_problem(addr)
    if problem:
        raise LockfileError(
            f"{path}: entry {str(addr)[:120]!r} is not a resource address ({problem}); a crafted or "
            f"corrupt lock could make llmops act on files outside the project. {recover}")
    if not isinstance(raw, dict) or not isinstance(raw.get("fingerprint"), str):
        raise LockfileError(f"{path}: entry {addr!r} has no fingerprint (a string). {recover}")
    unknown = set(map(str, raw)) - set(_ENTRY_KEYS)
    if unknown:
        raise LockfileError(f"{path}: entry {addr!r} has unknown keys {sorted(unknown)}. {recover}")
    for key in ("spec", "files", "upstreams", "inputs", "outputs"):
        if not isinstance(raw.get(key) or {}, dict):
            raise LockfileError(f"{path}: entry {addr!r}: `{key}` must be a mapping. {recover}")
    for key in ("files", "upstreams"):
        for k, v in (raw.get(key) or {}).items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise LockfileError(f"{path}: entry {addr!r}: `{key}` must map strings to strings "
                                    f"(found {str(k)[:60]!r}: {str(v)[:60]!r}). {recover}")
    for up in raw.get("upstreams") or {}:
        problem = address_problem(up)
        if problem:
            raise LockfileError(f"{path}: entry {addr!r}: upstream {up[:120]!r} is not a resource address "
                                f"({problem}). {recover}")
    return LockedResource(
        address=addr,
        fingerprint=raw["fingerprint"],
        spec=raw.get("spec") or {},
        files=raw.get("files") or {},
        upstreams=raw.get("upstreams") or {},
        inputs=raw.get("inputs") or {},
        outputs=raw.get("outputs") or {},
    )


# Parsing YAML in pure Python dominates plan time on big projects, so the parsed lock is
# cached as JSON under .llmops/cache/, keyed by the sha256 of the lock's text.
def _cache_path(path: Path) -> Path:
    return path.parent / ".llmops" / "cache" / "lock-parsed.json"


def _read_parse_cache(path: Path, digest: str) -> Any:
    try:
        raw = json.loads(_cache_path(path).read_text())
    except (OSError, ValueError):
        return None
    return raw.get("data") if isinstance(raw, dict) and raw.get("digest") == digest else None


def _write_parse_cache(path: Path, digest: str, data: Any) -> None:
    if not isinstance(data, dict):
        return
    try:
        atomic_write_text(_cache_path(path), json.dumps({"digest": digest, "data": data}, default=str))
    except (OSError, TypeError, ValueError):
        pass  # only a cache


def save_lock(lock: Lock, path: Path) -> None:
    """Write the whole lock atomically (temp file, fsync, rename); it supersedes a journal."""
    text = lock.dumps()
    digest = hashlib.sha256(text.encode()).hexdigest()
    journal = journal_path(path)
    if journal.exists():
        # Named before the replace: a kill between the two leaves a journal known to be folded in.
        fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            _append(fd, json.dumps({"op": "compacted", "digest": digest}))
        finally:
            os.close(fd)
        atomic_write_text(path, text)
        journal.unlink(missing_ok=True)
    else:
        atomic_write_text(path, text)
    lock._loaded_digest = digest


def journal_path(path: Path) -> Path:
    """Where the journal of lock file `path` lives (in the project's state folder)."""
    return path.parent / ".llmops" / JOURNAL_NAME


class LockJournal:
    """Records an apply's changes to `lock` (saved at `path`) as they happen, at a cost that
    does not grow with the lock: one fsynced journal line per change (see the module docstring).

    The first change is a whole-lock write (the lock file then exists and holds everything up
    to it, as before journals) and starts a journal extending that file; so does a change whose
    value JSON cannot carry exactly. `close` folds the journal into llmops.lock. Used by one
    thread.
    """

    def __init__(self, lock: Lock, path: Path) -> None:
        self.lock = lock
        self.path = path
        self.pending = 0  # changes in the journal, not yet in llmops.lock
        self._fd: int | None = None

    def set(self, entry: LockedResource) -> None:
        self.lock.set(entry)
        self._record({"op": "set", "address": entry.address, "entry": entry.to_dict()})

    def remove(self, address: str) -> None:
        self.lock.remove(address)
        self._record({"op": "remove", "address": address})

    def close(self) -> None:
        """Write llmops.lock with every change (when the journal holds some) and drop the journal."""
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        if self.pending:
            save_lock(self.lock, self.path)
        else:
            journal_path(self.path).unlink(missing_ok=True)  # header only: the lock holds everything
        self.pending = 0

    def _record(self, record: dict[str, Any]) -> None:
        line = _exact_json(record)
        if self._fd is not None and line is not None:
            _append(self._fd, line)
            self.pending += 1
            return
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        save_lock(self.lock, self.path)  # folds in (and drops) the journal so far
        self._start()

    def _start(self) -> None:
        journal = journal_path(self.path)
        header = {"llmops_lock_journal": JOURNAL_VERSION, "base": self.lock._loaded_digest}
        atomic_write_text(journal, json.dumps(header, sort_keys=True) + "\n")  # all of the header or none
        self._fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        _fsync_dir(journal.parent)
        self.pending = 0


def _exact_json(record: dict[str, Any]) -> str | None:
    """The record as one JSON line, or None when reading it back would not give the same values
    (tuples, non-string keys, dates, NaN): those are written into the lock whole instead."""
    try:
        line = json.dumps(record, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return line if json.loads(line) == record else None


def _append(fd: int, line: str) -> None:
    """Append one line and sync it: once this returns, a kill of this process cannot lose it."""
    data = (line + "\n").encode()
    while data:
        data = data[os.write(fd, data):]
    os.fdatasync(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the file itself is synced
    finally:
        os.close(fd)


def compact_journal(path: Path) -> bool:
    """Fold the journal a killed apply left into llmops.lock at `path`, when there is one (call it
    holding the apply lock). True when it wrote the lock."""
    if not journal_path(path).exists():
        return False
    save_lock(load_lock(path), path)
    return True


def _open_journal(path: Path) -> int | None:
    try:
        return os.open(journal_path(path), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LockfileError(f"{journal_path(path)}: cannot read the apply journal ({exc.strerror}). Check that "
                            "it is a readable file.") from exc


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _replay(lock: Lock, path: Path, data: bytes) -> None:
    """Apply the journal's changes onto `lock` (read from `path`) when it extends that very file."""
    journal = journal_path(path)
    drop = (f"Delete it (`rm {journal}`) to drop what it recorded (`llmops plan` then plans those "
            "resources again), or restore the llmops.lock it extends.")
    # What follows the last newline is a line still being written (or cut short by a kill):
    # its change had not been recorded yet.
    lines = data.split(b"\n")[:-1]
    if not lines:
        return
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, ValueError, RecursionError):
            record = None
        if (not isinstance(record, dict) or _depth(record) > MAX_DEPTH
                or (number > 1 and record.get("op") not in ("set", "remove", "compacted"))):
            raise LockfileError(f"{journal}:{number}: the apply journal is corrupt. {drop}")
        records.append(record)
    header, changes = records[0], records[1:]
    if header.get("llmops_lock_journal") != JOURNAL_VERSION or not isinstance(header.get("base"), str):
        raise LockfileError(f"{journal}: not an apply journal this llmops reads (header {lines[0][:80]!r}). "
                            f"{drop}")
    digest = lock._loaded_digest
    if header.get("base") != digest:
        addrs = sorted({str(r.get("address")) for r in changes if r["op"] != "compacted"})
        if not addrs or any(r["op"] == "compacted" and r.get("digest") == digest for r in changes):
            return  # it holds nothing, or the lock was written from it and only its deletion was cut short
        shown = ", ".join(addrs[:3]) + (f" and {len(addrs) - 3} more" if len(addrs) > 3 else "")
        raise LockfileError(
            f"{journal}: an apply that did not finish recorded changes to {len(addrs)} resource(s) ({shown}) "
            f"on top of another llmops.lock than the one at {path} (it changed since, e.g. by a git checkout "
            f"or pull, or was deleted); llmops does not apply them to this lock. {drop}")
    for number, record in enumerate(changes, 2):
        if record["op"] == "compacted":
            break  # the lock was being replaced by one with all of the above
        if record["op"] == "remove":
            problem = address_problem(record.get("address"))
            if problem:
                raise LockfileError(f"{journal}:{number}: {problem}. {drop}")
            lock.remove(record["address"])
        else:
            lock.set(_entry(journal, record.get("address"), record.get("entry"), drop))
