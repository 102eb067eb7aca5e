"""llmops.lock: what was last applied, one entry per resource, pinned to content hashes.

Invariants:
- The file starts with a header comment, then `lock_version`, then `resources`.
- Resources are sorted by address (kind order, then name); keys inside are sorted.
- The same state always serialises to the same bytes.
- Writes go to a temp file in the same folder, are fsynced, then `os.replace`d: a crash
  leaves either the old or the new file, never a torn one.
- Each resource is one block separated by a blank line, so two branches that change
  different resources merge without conflict in git.

Serialisation is cached per resource block, so writing the lock after every resource of
a big apply costs a string join, not a re-dump of every entry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmops.addrs import address_problem, address_sort_key
from llmops.errors import LockfileError
from llmops.fsutil import atomic_write_text

LOCK_VERSION = 1
LOCK_NAME = "llmops.lock"
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

    fingerprint: the resource's fingerprint when applied (see llmops.fingerprint).
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
    # Digest of the text this lock was loaded from, while unmodified (saves a re-dump).
    _loaded_digest: str | None = field(default=None, repr=False, compare=False)

    def get(self, address: str) -> LockedResource | None:
        return self.resources.get(address)

    def set(self, entry: LockedResource) -> None:
        self.resources[entry.address] = entry
        self._blocks.pop(entry.address, None)
        self._loaded_digest = None

    def remove(self, address: str) -> None:
        self.resources.pop(address, None)
        self._blocks.pop(address, None)
        self._loaded_digest = None

    def dumps(self) -> str:
        parts = [HEADER, f"lock_version: {LOCK_VERSION}\n"]
        if not self.resources:
            parts.append("resources: {}\n")
            return "".join(parts)
        parts.append("resources:\n")
        for addr in sorted(self.resources, key=address_sort_key):
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
    """Load and validate a lockfile; a missing file is an empty lock."""
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
        lock.resources[addr] = LockedResource(
            address=addr,
            fingerprint=raw["fingerprint"],
            spec=raw.get("spec") or {},
            files=raw.get("files") or {},
            upstreams=raw.get("upstreams") or {},
            inputs=raw.get("inputs") or {},
            outputs=raw.get("outputs") or {},
        )
    lock._loaded_digest = digest
    return lock


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
    """Write the lock atomically (temp file, fsync, rename)."""
    atomic_write_text(path, lock.dumps())
