"""Fingerprints: what a resource *is*, as one hash.

fingerprint = sha256(kind + canonical spec without cosmetic fields and documented defaults +
md5 of every file it reads + provider content fingerprint + fingerprints of its upstreams).
Change anything upstream and every downstream fingerprint changes with it; write out a
default and nothing changes.

File md5s are cached by (size, mtime_ns) in `.llmops/cache/file-md5.json`, as DVC does,
so a plan does not re-read unchanged files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmops.hashing import file_md5, sha256_json
from llmops.redact import redact_spec
from llmops.config.schema import without_defaults

# Fields that never change what a resource is: not part of the fingerprint.
COSMETIC_FIELDS = frozenset({"description"})
# Fields kept in the lock (they matter for plan) but not in the fingerprint.
LOCK_ONLY_FIELDS = frozenset({"protect"})


def locked_spec(spec: dict[str, Any], kind: str = "") -> dict[str, Any]:
    """The spec as recorded in the lock and shown in plans: documented defaults and cosmetic
    fields removed (`llmops.config.schema.without_defaults`), secrets redacted (`llmops.redact`)."""
    return redact_spec({k: v for k, v in without_defaults(kind, spec).items() if k not in COSMETIC_FIELDS})


def fingerprint_spec(spec: dict[str, Any], kind: str = "") -> dict[str, Any]:
    """What a fingerprint covers: the normalised, redacted spec, so writing out a default or
    changing a password rebuilds nothing."""
    return {k: v for k, v in locked_spec(spec, kind).items() if k not in LOCK_ONLY_FIELDS}


def fingerprint(
    kind: str,
    spec: dict[str, Any],
    files: dict[str, str],
    upstreams: dict[str, str],
    content: str | None = None,
) -> str:
    payload = {
        "kind": kind,
        "spec": fingerprint_spec(spec, kind),
        "files": files,
        "upstreams": upstreams,
        "content": content,
    }
    return "sha256:" + sha256_json(payload)


class FileHasher:
    """md5 of project files, cached by size and mtime across runs."""

    def __init__(self, root: Path, cache_path: Path | None = None) -> None:
        self.root = root
        self.cache_path = cache_path
        self._cache: dict[str, list] = {}
        self._dirty = False
        if cache_path and cache_path.is_file():
            try:
                self._cache = json.loads(cache_path.read_text())
            except (ValueError, OSError):
                self._cache = {}  # a broken cache is only a cache: start over

    def md5(self, rel: str) -> str:
        """md5 of a project-relative file; 'missing' when it does not exist."""
        path = self.root / rel
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return "missing"
        key = str(rel)
        hit = self._cache.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        digest = file_md5(path)
        self._cache[key] = [st.st_size, st.st_mtime_ns, digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        if not (self._dirty and self.cache_path):
            return
        from llmops.fsutil import atomic_write_text

        try:
            atomic_write_text(self.cache_path, json.dumps(self._cache, sort_keys=True))
        except OSError:
            pass  # the cache is an optimisation; a read-only project still plans
        self._dirty = False
