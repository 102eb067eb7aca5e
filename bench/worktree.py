"""A detached git worktree of an earlier commit in a scratch folder, for benches that run an
earlier version side by side with this checkout (each through PYTHONPATH, one .venv)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def baseline_tree(rev: str, prefix: str) -> Iterator[tuple[Path, Path]]:
    """(scratch folder, worktree of `rev` inside it); both removed on exit."""
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    tree = scratch / "baseline"
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(tree), rev], cwd=REPO, check=True)
    try:
        yield scratch, tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
        shutil.rmtree(scratch, ignore_errors=True)
