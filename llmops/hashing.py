"""Content digests: of a file, of a folder, of a JSON value. The one place llmops hashes content.

- `file_md5` (what DVC 3 records for a file) and `file_sha256` (model weights, tokenizers),
  both read in 1 MiB chunks.
- `folder_hashes(folder)`: {relative posix path: sha256} of the files of a folder, and
  `folder_sha256(folder)`, one digest over them. Both follow ONE rule for what a folder's
  content is (`is_skipped`): its regular files (links to regular files count as the file),
  except any whose relative path has a part starting with "." — `.git/` (a clone's `.git/HEAD`
  changes with every checkout, not with the model), `.cache/` (Hugging Face download
  metadata), `.gitattributes`, `.DS_Store`. `providers.base_models.FileHashCache` applies
  the same rule with a stat cache.
- `canonical_json(value)`: THE canonical JSON text of a value (sorted keys, compact
  separators, UTF-8 text rather than \\u escapes, `str()` for what JSON has no type for),
  and `sha256_json(value)` its hex sha256. Fingerprints, plan digests and row identities
  are built from it.

Digests already recorded in llmops.lock must keep their values, so two older JSON forms stay
reachable as keywords: `ensure_ascii=True` (\\u escapes; base-model content digests) and
`compact=False` (", " and ": " separators; a fine-tune's `base_model_files_sha` input).
Use neither for anything new.

Standard library only: the training process (`llmops.train.job`) imports it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePath
from typing import Any, Callable

CHUNK = 1 << 20  # bytes read at a time


def _file_digest(path: Path, h: Any) -> str:
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def file_md5(path: Path | str) -> str:
    """Hex md5 of a file's bytes."""
    return _file_digest(Path(path), hashlib.md5())


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file's bytes."""
    return _file_digest(Path(path), hashlib.sha256())


def is_skipped(rel: PurePath) -> bool:
    """Whether a path (relative to the folder being hashed) is left out of the folder's
    content: it, or a folder above it, is hidden (name starts with ".")."""
    return any(part.startswith(".") for part in rel.parts)


def folder_hashes(folder: Path | str, file_hash: Callable[[Path], str] = file_sha256) -> dict[str, str]:
    """{relative posix path: `file_hash(path)`} of the files of `folder` (see `is_skipped`),
    in sorted path order."""
    folder = Path(folder)
    out: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not is_skipped(rel) and path.is_file():
            out[rel.as_posix()] = file_hash(path)
    return out


def folder_sha256(folder: Path | str) -> str:
    """One hex sha256 over a folder's files: each relative name and its sha256, sorted."""
    h = hashlib.sha256()
    for rel, digest in folder_hashes(folder).items():
        h.update(rel.encode() + b"\0")
        h.update(digest.encode() + b"\n")
    return h.hexdigest()


def canonical_json(value: Any, *, default: Callable[[Any], Any] | None = str,
                   ensure_ascii: bool = False, compact: bool = True) -> str:
    """The canonical JSON text of `value`: sorted keys, compact separators, non-ASCII kept as
    text; `default` converts what JSON has no type for (None: such a value is a TypeError).
    `ensure_ascii` and `compact=False` only reproduce digests recorded in older locks."""
    return json.dumps(value, sort_keys=True, separators=(",", ":") if compact else None,
                      ensure_ascii=ensure_ascii, default=default)


def sha256_json(value: Any, *, default: Callable[[Any], Any] | None = str,
                ensure_ascii: bool = False, compact: bool = True) -> str:
    """Hex sha256 of `canonical_json(value, ...)` as UTF-8."""
    text = canonical_json(value, default=default, ensure_ascii=ensure_ascii, compact=compact)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
