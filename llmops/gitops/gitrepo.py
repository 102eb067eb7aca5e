"""The git checkout an apply runs in, read through `git` subprocesses.

`GitRepo.open(project_root)` finds the repository around the llmops project (which may sit in
a sub-folder: `prefix` is its repository-relative folder). Everything here only reads; a
failing git command becomes a `GitError` that says what to do.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from llmops.errors import LlmopsError

GIT_TIMEOUT_S = 60.0


class GitError(LlmopsError):
    """git could not answer (not a repository, missing history, git not installed)."""


@dataclass(frozen=True)
class GitRepo:
    """The repository at `top` holding the llmops project at `top / prefix`."""

    top: Path
    prefix: str  # "" or "sub/dir/" (repository-relative, with a trailing slash)

    @classmethod
    def open(cls, project_root: Path) -> GitRepo:
        out = _git(project_root, "rev-parse", "--show-toplevel", what="find the git repository").strip()
        top = Path(out).resolve()
        rel = project_root.resolve().relative_to(top).as_posix()
        return cls(top, "" if rel in ("", ".") else rel.rstrip("/") + "/")

    def rel(self, project_path: str) -> str:
        """A project-relative path as a repository-relative one."""
        clean = PurePosixPath(project_path).as_posix()
        return self.prefix.rstrip("/") if clean == "." else self.prefix + clean

    def git(self, *args: str, what: str) -> str:
        return _git(self.top, *args, what=what)

    def head(self) -> str:
        return self.git("rev-parse", "--verify", "HEAD^{commit}", what="read HEAD").strip()

    def status(self) -> list[tuple[str, str]]:
        """(XY status, repository-relative path) of every change git sees, untracked files too."""
        out = self.git("status", "--porcelain=v1", "-z", "--untracked-files=all", what="read the working tree status")
        entries: list[tuple[str, str]] = []
        fields = out.split("\0")
        i = 0
        while i < len(fields):
            item = fields[i]
            i += 1
            if len(item) < 4:
                continue
            code, path = item[:2], item[3:]
            entries.append((code, path))
            if code[0] in "RC":  # a rename/copy is followed by its source path
                i += 1
        return entries

    def has_commit(self, sha: str) -> bool:
        proc = _run(self.top, "cat-file", "-e", f"{sha}^{{commit}}")
        return proc.returncode == 0

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        proc = _run(self.top, "merge-base", "--is-ancestor", ancestor, descendant)
        if proc.returncode not in (0, 1):
            raise GitError(f"git merge-base failed: {proc.stderr.strip()[:300]}; check the repository.")
        return proc.returncode == 0

    def parents(self, sha: str) -> list[str]:
        out = self.git("rev-list", "--parents", "-n", "1", sha, what=f"read the parents of {sha[:12]}")
        return out.split()[1:]

    def commits_touching(self, since: str | None, head: str, paths: list[str]) -> list[str]:
        """Commits (newest first) after `since` up to `head` that changed any of `paths`;
        `since` None: the whole history of `head`. Merges that only bring in another side's
        commits are left out (those commits are listed); a merge that itself changes a path
        is listed."""
        span = f"{since}..{head}" if since else head
        out = self.git("log", "--format=%H", span, "--", *paths, what="list the commits that changed the deployment")
        return [line for line in out.split() if line]

    def show(self, sha: str, path: str) -> str | None:
        """The text of repository-relative `path` at commit `sha`; None when it is absent there."""
        proc = _run(self.top, "show", f"{sha}:{path}")
        if proc.returncode != 0:
            if not self.has_commit(sha):
                raise GitError(
                    f"commit {sha[:12]} is not in this clone; fetch the whole history "
                    "(actions/checkout with `fetch-depth: 0`) and re-run."
                )
            return None
        return proc.stdout


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
            stdin=subprocess.DEVNULL, check=False, encoding="utf-8", errors="replace",
        )
    except FileNotFoundError:
        raise GitError("git is not installed; protected promotions read the repository's history: "
                       "install git and re-run.") from None
    except subprocess.TimeoutExpired:
        raise GitError(f"git {args[0]} took more than {GIT_TIMEOUT_S:g}s; check the repository.") from None


def _git(cwd: Path, *args: str, what: str) -> str:
    proc = _run(cwd, *args)
    if proc.returncode != 0:
        said = proc.stderr.strip().splitlines()
        detail = said[-1][:300] if said else f"exit {proc.returncode}"
        raise GitError(f"cannot {what} (git {args[0]}: {detail}); protected promotions need a git checkout "
                       "with its history (actions/checkout with `fetch-depth: 0`).")
    return proc.stdout
