"""The drift reference on disk: built once per training split, read back on later runs.

`cached_reference(root, key, build)` returns the `drift.Reference` stored under
`.llmops/monitor/reference/KEY.npz`, or calls `build()` and stores what it returns. The key
(`reference_key`) is a sha256 of everything the reference is made from: the md5 of the
training split in llmops.lock, the digest of the prompt that renders its rows, and
`drift.REFERENCE_VERSION` (word splitting, hash buckets, bins, the row cap). A changed
dataset or prompt therefore gets a new key and a fresh build; nothing is ever invalidated in
place. A cache file that cannot be read (truncated, not an npz, other arrays, another key
inside) is rebuilt and overwritten, never trusted and never an error; one that cannot be
written only costs the next run a rebuild. Files are written atomically (temp file, rename);
the newest `KEEP_FILES` stay and older ones are removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from llmops.fsutil import atomic_write_bytes
from llmops.monitor.drift import REFERENCE_VERSION, Reference

CACHE_DIR = Path(".llmops") / "monitor" / "reference"
KEEP_FILES = 16
HIT, BUILT, REBUILT, UNCACHED = "hit", "built", "rebuilt", "uncached"


def reference_key(dataset_md5: str, prompt_digest: str) -> str | None:
    """The cache key of the reference of a training split (its locked md5) rendered with a
    prompt (its `PromptTemplate.digest()`); None without an md5 (nothing to key it by)."""
    if not dataset_md5:
        return None
    blob = json.dumps({"dataset_md5": dataset_md5, "prompt": prompt_digest, "version": REFERENCE_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def cache_path(root: Path | str, key: str) -> Path:
    return Path(root) / CACHE_DIR / f"{key}.npz"


def cached_reference(root: Path | str, key: str | None,
                     build: Callable[[], Reference | None]) -> tuple[Reference | None, str]:
    """`(reference, how)`: `how` is "hit" (read from the cache), "built" (no cache file yet),
    "rebuilt" (the cache file was unreadable) or "uncached" (no key: built, not stored).
    `build` returning None (no usable training rows) stores nothing."""
    if key is None:
        return build(), UNCACHED
    path = cache_path(root, key)
    how = BUILT
    if path.is_file():
        found = _load(path, key)
        if found is not None:
            _touch(path)
            return found, HIT
        how = REBUILT
    reference = build()
    if reference is not None:
        _store(path, key, reference)
    return reference, how


def _load(path: Path, key: str) -> Reference | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["key"]) != key:
                return None
            return Reference.from_arrays(npz)
    except Exception:  # noqa: BLE001 - any unreadable cache file is rebuilt, whatever broke it
        return None


def _store(path: Path, key: str, reference: Reference) -> None:
    buf = io.BytesIO()
    np.savez(buf, key=np.asarray(key), **reference.to_arrays())
    try:
        atomic_write_bytes(path, buf.getvalue())
        _prune(path.parent)
    except OSError:
        return  # a read-only or full disk: the next run builds the reference again


def _touch(path: Path) -> None:
    try:
        os.utime(path)  # the newest-used files survive pruning
    except OSError:
        pass


def _prune(folder: Path) -> None:
    files = sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for old in files[KEEP_FILES:]:
        old.unlink(missing_ok=True)
