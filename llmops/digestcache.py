"""Plain-data results cached by the digest of the exact bytes they were derived from.

Plan at 10,000 resources spends most of its time re-deriving the same things from unchanged
files: the parsed llmops.yaml (with the position of every node) and the files each prompt
reads (a Jinja compile of every template). Those results are plain JSON data, so they are
kept under `.llmops/cache/NAME.json`, keyed by a sha256 of their inputs.

The cache folder is not committed, but CI caches can restore it, and a pull request check
runs plan on content someone else wrote; so a cache file is authenticated as a whole: its
first line is an HMAC-SHA256, under this user's key kept outside the project (the key the
validation cache uses), of the JSON text that follows. A file that fails the check, does not
parse, or holds anything but the expected plain data is ignored and rewritten: a cache can
cost a recomputation, never change a result. Values are JSON only (never pickle or code),
and a value JSON cannot carry exactly (dates, bytes) is simply not cached.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any


def digest(*parts: str | bytes) -> str:
    """sha256 over `parts`, each length-prefixed (so no two part lists collide)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8", "surrogatepass") if isinstance(part, str) else part
        h.update(f"{len(data)}:".encode())
        h.update(data)
    return h.hexdigest()


def cache_secret() -> bytes | None:
    """This user's key for local cache entries (the validation cache and `DigestCache`), kept
    outside any project; None if it cannot be kept."""
    import secrets

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmops"
    path = base / "checks.key"
    try:
        data = path.read_bytes()
        if len(data) >= 32:
            return data
    except OSError:
        pass
    try:
        base.mkdir(parents=True, exist_ok=True)
        tmp = base / f".checks.key.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # first writer wins; a concurrent one reads the winner's key
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        data = path.read_bytes()
        return data if len(data) >= 32 else None
    except (OSError, RuntimeError):
        return None


class DigestCache:
    """{key: plain JSON value}, read once, written back by `save` when something changed.

    Only the entries used or added in this run are written back, so entries for old
    content do not pile up. Without a key (no writable home cache folder) nothing is cached.
    """

    def __init__(self, path: Path, keep_unused: bool = False) -> None:
        self.path = Path(path)
        self.keep_unused = keep_unused
        self._secret: bytes | None = None
        self._old: dict[str, Any] | None = None
        self._new: dict[str, Any] = {}
        self._dirty = False

    def _mac(self, text: bytes) -> str:
        assert self._secret is not None
        return hmac.new(self._secret, b"llmops-digest-cache\0" + self.path.name.encode() + b"\0" + text,
                        hashlib.sha256).hexdigest()

    def _load(self) -> dict[str, Any]:
        if self._old is not None:
            return self._old
        self._secret = cache_secret()
        self._old = {}
        if self._secret is None:
            return self._old
        try:
            raw = self.path.read_bytes()
        except OSError:
            return self._old
        mac, _, text = raw.partition(b"\n")
        if not hmac.compare_digest(mac.decode("ascii", "replace"), self._mac(text)):
            self._dirty = True  # planted, corrupt or from another user's key: rewrite it
            return self._old
        try:
            data = json.loads(text)
        except ValueError:
            self._dirty = True
            return self._old
        if isinstance(data, dict):
            self._old = data
        else:
            self._dirty = True
        return self._old

    def get(self, key: str) -> Any:
        """The value stored under `key`, or None. Callers still check its shape."""
        old = self._load()
        if self._secret is None:
            return None
        value = old.get(key)
        if value is not None and key not in self._new:
            self._new[key] = value
        return value

    def put(self, key: str, value: Any) -> None:
        """Store `value` (plain JSON data); a value JSON cannot carry exactly is dropped."""
        self._load()
        if self._secret is None:
            return
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            self._new.pop(key, None)
            return
        self._new[key] = value
        self._dirty = True

    def discard(self, key: str) -> None:
        """Forget `key` (its entry was stale): the file is rewritten without it."""
        if self._new.pop(key, None) is not None or (self._old and key in self._old):
            self._dirty = True

    def save(self) -> None:
        if self._secret is None or self._old is None:
            return
        out = {**self._old, **self._new} if self.keep_unused else self._new
        if not self._dirty and out.keys() == self._old.keys():
            return
        from llmops.fsutil import atomic_write_text

        try:
            text = json.dumps(out, sort_keys=True, separators=(",", ":"), allow_nan=False)
            mac = self._mac(text.encode("utf-8"))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, mac + "\n" + text)
        except (OSError, TypeError, ValueError):
            return  # only a cache
        self._old, self._dirty = out, False
