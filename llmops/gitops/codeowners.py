"""CODEOWNERS as GitHub reads it: where the file is, and who owns a path.

GitHub uses the first of `.github/CODEOWNERS`, `CODEOWNERS` and `docs/CODEOWNERS` at the
repository root (paths are repository-relative, not relative to the llmops project, which may
live in a sub-folder). Patterns follow gitignore rules (matched here by `pathspec`, a maintained
gitwildmatch implementation) with GitHub's exceptions: the last matching line wins, a trailing
`/*` owns only the files directly in that folder (`docs/*` owns `docs/a.md`, not
`docs/sub/a.md`), and `!` negation and `[...]` ranges are not supported (such lines are skipped,
as GitHub ignores them). `find_codeowners` takes a reader, so the same lookup serves the working
tree and a commit (`git show BASE:path`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import pathspec

CODEOWNERS_LOCATIONS = (".github/CODEOWNERS", "CODEOWNERS", "docs/CODEOWNERS")


def parse_codeowners(text: str, path: str) -> list[str]:
    """Owners of the repository-relative `path`: those of the last line whose pattern matches."""
    path = path.lstrip("/")
    owners: list[str] = []
    for raw in text.splitlines():
        line = _strip_comment(raw).strip()
        if not line:
            continue
        pattern, *line_owners = line.split()
        if _matches(pattern, path):
            owners = line_owners
    return owners


def _strip_comment(line: str) -> str:
    if line.lstrip().startswith("#"):
        return ""
    return re.split(r"\s#", line, maxsplit=1)[0]


def _matches(pattern: str, path: str) -> bool:
    if pattern.startswith("!") or "[" in pattern:  # not supported by GitHub's CODEOWNERS
        return False
    spec = pathspec.GitIgnoreSpec.from_lines([pattern])
    if not spec.match_file(path):
        return False
    if pattern.endswith("/*"):
        # gitignore would also match `docs/sub` (a folder) and so everything below it;
        # GitHub's `docs/*` owns only the files directly in docs/.
        parent = path.rpartition("/")[0]
        return not (parent and spec.match_file(parent))
    return True


def find_codeowners(read: Callable[[str], str | None]) -> tuple[str, str] | None:
    """(location, text) of the CODEOWNERS file GitHub would use; `read(rel)` returns a
    repository file's text or None when it is absent."""
    for rel in CODEOWNERS_LOCATIONS:
        text = read(rel)
        if text is not None:
            return rel, text
    return None


def working_tree_reader(repo_root: Path) -> Callable[[str], str | None]:
    """A reader for `find_codeowners` over the files checked out at `repo_root`."""

    def read(rel: str) -> str | None:
        candidate = repo_root / rel
        try:
            return candidate.read_text(encoding="utf-8", errors="replace") if candidate.is_file() else None
        except OSError:
            return None

    return read
