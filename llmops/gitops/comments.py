"""The sticky pull-request comment: one comment per PR, found by a hidden marker, updated in place.

`upsert_sticky_comment` lists the PR's issue comments (all pages), PATCHes the one whose
body starts with the marker *and* whose author is the token's own identity (see
`GitHubClient.login`), or POSTs a new one: a marker in anybody else's comment is left alone.
`comment_on_pr` is what `llmops pr comment` calls: it reads the body file and the PR number
from the workflow's environment.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from llmops.errors import LlmopsError
from llmops.gitops.github import GitHubClient, client_from_env

PLAN_MARKER = "<!-- llmops-plan -->"
MAX_COMMENT_CHARS = 65_536  # GitHub's limit for an issue comment body


@dataclass(frozen=True)
class StickyComment:
    """Result of an upsert: action is "created" or "updated"."""

    action: str
    comment_id: int
    pr_number: int
    url: str = ""


def bound_body(body: str, marker: str = PLAN_MARKER, limit: int = MAX_COMMENT_CHARS) -> str:
    """`body` starting with `marker`, cut (with a note saying so) to at most `limit` characters."""
    if not body.startswith(marker):
        body = f"{marker}\n{body}"
    if len(body) <= limit:
        return body
    note = "\n\n…\n\n> **Truncated:** {n:,} characters did not fit in one comment; see the job summary.\n"
    cut = body[: limit - len(note.format(n=len(body)))]
    if cut.rfind("\n") > len(marker):  # end on a whole line, keeping the marker
        cut = cut[: cut.rfind("\n")]
    return cut + note.format(n=len(body) - len(cut))


def upsert_sticky_comment(
    client: GitHubClient, pr_number: int, body: str, marker: str = PLAN_MARKER, login: str | None = None
) -> tuple[str, int]:
    """Update the PR comment that starts with `marker` and was written by this token's own
    login (`login`, else `client.login()`), or create one: ("updated"|"created", id)."""
    if not marker.strip():
        raise LlmopsError("The sticky comment marker is empty; pass a marker such as <!-- llmops-plan -->.")
    text = bound_body(body, marker)
    me = (login or client.login()).lower()
    comments = client.get_paginated(client.repo_path(f"issues/{pr_number}/comments"))
    for comment in comments:
        author = str((comment.get("user") or {}).get("login") or "").lower()
        # Only our own comment is ours to edit: a marker in someone else's is left alone (and
        # GitHub would refuse the edit with 403).
        if author == me and (comment.get("body") or "").startswith(marker):
            updated = client.patch(client.repo_path(f"issues/comments/{comment['id']}"), {"body": text})
            return "updated", int(_field(updated, "id", comment["id"]))
    created = client.post(client.repo_path(f"issues/{pr_number}/comments"), {"body": text})
    return "created", int(_field(created, "id", None))


def _field(data: Any, key: str, default: Any) -> Any:
    value = data.get(key, default) if isinstance(data, dict) else default
    if value is None:
        raise LlmopsError(f"GitHub's answer has no comment {key}; check GITHUB_API_URL points at the REST API.")
    return value


def pr_number_from_env(env: Mapping[str, str]) -> int:
    """The pull request number from GITHUB_EVENT_PATH (pull_request.number, or issue.number)."""
    path = env.get("GITHUB_EVENT_PATH")
    if not path:
        raise LlmopsError("No pull request number: pass --pr N, or run inside a pull_request workflow (GITHUB_EVENT_PATH).")
    try:
        event = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise LlmopsError(f"Cannot read the GitHub event file {path}: {err}; pass --pr N instead.") from None
    for key in ("pull_request", "issue"):
        number = (event.get(key) or {}).get("number") if isinstance(event, dict) else None
        if isinstance(number, int):
            return number
    raise LlmopsError(
        f"The GitHub event in {path} is not about a pull request (no pull_request.number); "
        "run on `pull_request` events or pass --pr N."
    )


def comment_on_pr(
    body_file: Path,
    *,
    pr_number: int | None = None,
    marker: str = PLAN_MARKER,
    env: Mapping[str, str] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> StickyComment:
    """Post or update the sticky comment on a PR with the contents of `body_file`."""
    try:
        body = Path(body_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LlmopsError(f"Cannot read the comment body {body_file}: {err}; write the plan there first.") from None
    return post_sticky_comment(body, pr_number=pr_number, marker=marker, env=env, settings=settings)


def post_sticky_comment(
    body: str,
    *,
    pr_number: int | None = None,
    marker: str = PLAN_MARKER,
    env: Mapping[str, str] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> StickyComment:
    """Post or update the sticky comment on a PR with `body` (GitHub settings from `env`)."""
    env = os.environ if env is None else env
    number = pr_number if pr_number is not None else pr_number_from_env(env)
    client = client_from_env(env, settings)
    action, comment_id = upsert_sticky_comment(client, number, body, marker, login=client.login(env))
    server = env.get("GITHUB_SERVER_URL", "https://github.com").rstrip("/")
    url = f"{server}/{client.repo}/pull/{number}#issuecomment-{comment_id}"
    return StickyComment(action, comment_id, number, url)
