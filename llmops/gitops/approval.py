"""Promotion approvals: who may approve (CODEOWNERS / config) and whether they did.

A deployment with `approval: required` is promoted only when the merged pull request that
introduced the change was approved by an allowed reviewer on its last commit, and no
reviewer's latest word on it is "changes requested". `check_approval` reads that from the
GitHub REST API; `check_local_approval` handles `--approved-by` outside GitHub. Both return
an `Approval` and never approve on doubt: an API failure raises `GitHubError`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from llmops.gitops.github import GitHubClient, GitHubError

CODEOWNERS_LOCATIONS = (".github/CODEOWNERS", "CODEOWNERS", "docs/CODEOWNERS")
_DECISIVE = ("APPROVED", "CHANGES_REQUESTED", "DISMISSED")


@dataclass(frozen=True)
class Approval:
    """The answer for one promotion.

    approved: True only when every condition held. approver: the login (or local name) that
    approved. pr_number / commit: the pull request and the head commit its approval was for.
    reason: one sentence for people (why approved, or why not and what to do).
    source: "github" or "local".
    """

    approved: bool
    approver: str | None = None
    pr_number: int | None = None
    commit: str | None = None
    reason: str = ""
    source: str = "github"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- who may approve ----------------------------------------------------------------------


def parse_codeowners(text: str, path: str = "llmops.yaml") -> list[str]:
    """Owners of `path` in a CODEOWNERS file: the last matching line wins (as on GitHub)."""
    owners: list[str] = []
    for raw in text.splitlines():
        line = _strip_comment(raw).strip()
        if not line:
            continue
        pattern, *line_owners = line.split()
        if _codeowners_match(pattern.replace("\\#", "#"), path.lstrip("/")):
            owners = line_owners
    return owners


def _strip_comment(line: str) -> str:
    if line.lstrip().startswith("#"):
        return ""
    return re.split(r"(?<!\\)\s#", line, maxsplit=1)[0]


def _codeowners_match(pattern: str, path: str) -> bool:
    """gitignore-style matching as GitHub applies it to CODEOWNERS patterns."""
    anchored = pattern.startswith("/") or "/" in pattern.rstrip("/")
    directory = pattern.endswith("/")
    body = pattern.strip("/")
    regex = ""
    i = 0
    while i < len(body):
        if body.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif body.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif body[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif body[i] == "?":
            regex, i = regex + "[^/]", i + 1
        else:
            regex, i = regex + re.escape(body[i]), i + 1
    prefix = "" if anchored else "(?:.*/)?"
    # a pattern naming a folder also owns everything inside it
    tail = "/.*" if directory else "(?:/.*)?"
    return re.fullmatch(prefix + regex + tail, path) is not None


def find_codeowners(root: Path) -> Path | None:
    """The CODEOWNERS file GitHub would use for a repository rooted at `root`."""
    for rel in CODEOWNERS_LOCATIONS:
        candidate = root / rel
        if candidate.is_file():
            return candidate
    return None


def allowed_approvers(
    deployment: Mapping[str, Any], settings: Mapping[str, Any], root: Path, config_path: str = "llmops.yaml"
) -> list[str]:
    """deployments.X.approvers, else settings.approvers, else CODEOWNERS owners of the config."""
    if deployment.get("approvers"):
        return list(deployment["approvers"])
    if settings.get("approvers"):
        return list(settings["approvers"])
    codeowners = find_codeowners(root)
    return parse_codeowners(codeowners.read_text(), config_path) if codeowners else []


def _split_allowed(allowed: list[str]) -> tuple[set[str], list[tuple[str, str]]]:
    """("user", "@user", "@org/team", "x@example.com") -> ({users lower-cased}, [(org, team)])."""
    users: set[str] = set()
    teams: list[tuple[str, str]] = []
    for entry in allowed:
        name = entry.strip().lstrip("@")
        if "/" in name:
            org, _, team = name.partition("/")
            teams.append((org, team))
        elif name and "@" not in name:  # e-mail owners cannot be mapped to a login
            users.add(name.lower())
    return users, teams


# -- did they approve -----------------------------------------------------------------------


def check_approval(client: GitHubClient, repo: str, merge_sha: str, allowed: list[str]) -> Approval:
    """Was the merged PR behind `merge_sha` approved by one of `allowed` after its last commit?

    Raises GitHubError when GitHub cannot be asked; never returns approved on an error.
    """
    if not allowed:
        return Approval(
            False,
            reason="no approvers are configured: set deployments.NAME.approvers or settings.approvers, "
            "or add a CODEOWNERS line for llmops.yaml",
        )
    pr = _find_pull_request(client, repo, merge_sha)
    if pr is None:
        return Approval(
            False,
            commit=merge_sha,
            reason=f"no merged pull request contains commit {merge_sha[:12]}; protected promotions "
            "need a reviewed pull request (push through a PR, not directly to the branch)",
        )
    number = int(pr["number"])
    head = client.get(f"/repos/{repo}/pulls/{number}")["head"]["sha"]
    reviews = client.get_paginated(f"/repos/{repo}/pulls/{number}/reviews")
    return _decide(client, number, head, reviews, allowed)


def _find_pull_request(client: GitHubClient, repo: str, sha: str) -> dict[str, Any] | None:
    pulls = client.get_paginated(f"/repos/{repo}/commits/{sha}/pulls")
    merged = [p for p in pulls if p.get("merged_at")]
    for pr in merged:
        if pr.get("merge_commit_sha") == sha:
            return pr
    return merged[0] if merged else None


def _latest_decisive(reviews: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each reviewer's latest approve / request-changes / dismissed review, by login."""
    ordered = sorted(
        (r for r in reviews if r.get("state") in _DECISIVE and r.get("user")),
        key=lambda r: r.get("submitted_at") or "",
    )
    latest: dict[str, dict[str, Any]] = {}
    for review in ordered:
        latest[review["user"]["login"].lower()] = review
    return latest


def _decide(client: GitHubClient, number: int, head: str, reviews: list[dict[str, Any]], allowed: list[str]) -> Approval:
    latest = _latest_decisive(reviews)
    blockers = sorted(r["user"]["login"] for r in latest.values() if r["state"] == "CHANGES_REQUESTED")
    if blockers:
        return Approval(
            False,
            pr_number=number,
            commit=head,
            reason=f"pull request #{number} has changes requested by {', '.join(blockers)}; "
            "resolve them and get a new approval",
        )
    approvals = [r for r in latest.values() if r["state"] == "APPROVED"]
    current = [r for r in approvals if r.get("commit_id") == head]
    stale = [r for r in approvals if r.get("commit_id") != head]
    users, teams = _split_allowed(allowed)
    for review in sorted(current, key=lambda r: r.get("submitted_at") or "", reverse=True):
        login = review["user"]["login"]
        if login.lower() in users or _in_any_team(client, teams, login):
            return Approval(
                True,
                approver=login,
                pr_number=number,
                commit=head,
                reason=f"approved by {login} on pull request #{number} at {head[:12]}",
            )
    return Approval(False, pr_number=number, commit=head, reason=_why_not(number, head, current, stale, allowed))


def _why_not(number: int, head: str, current: list[dict], stale: list[dict], allowed: list[str]) -> str:
    who = ", ".join(allowed)
    if current:
        names = ", ".join(sorted(r["user"]["login"] for r in current))
        return f"pull request #{number} was approved by {names}, who may not approve this promotion; ask one of: {who}"
    if stale:
        names = ", ".join(sorted(r["user"]["login"] for r in stale))
        return (
            f"approval of pull request #{number} by {names} was for an older commit; commits were pushed "
            f"after it (head {head[:12]}): ask one of {who} to approve again"
        )
    return f"pull request #{number} has no approving review; ask one of: {who}"


def _in_any_team(client: GitHubClient, teams: list[tuple[str, str]], login: str) -> bool:
    for org, team in teams:
        try:
            membership = client.get(f"/orgs/{org}/teams/{team}/memberships/{login}")
        except GitHubError as err:
            if err.status == 404:  # GitHub's answer for "not a member"
                continue
            raise
        if isinstance(membership, dict) and membership.get("state") == "active":
            return True
    return False


def check_local_approval(name: str, settings: Mapping[str, Any], allowed: list[str]) -> Approval:
    """`--approved-by NAME` outside GitHub: only when settings.allow_local_approvals is true."""
    if not settings.get("allow_local_approvals"):
        return Approval(
            False,
            approver=name or None,
            source="local",
            reason="--approved-by is refused for deployments with `approval: required` unless "
            "settings.allow_local_approvals is true; approve through a reviewed pull request instead",
        )
    login = (name or "").strip().lstrip("@")
    if not login:
        return Approval(False, source="local", reason="--approved-by needs a name")
    users, teams = _split_allowed(allowed)
    if allowed and login.lower() not in users:
        extra = " (team membership cannot be checked locally)" if teams else ""
        return Approval(
            False,
            approver=login,
            source="local",
            reason=f"{login} may not approve this promotion{extra}; allowed: {', '.join(allowed)}",
        )
    return Approval(True, approver=login, source="local", reason=f"approved locally by {login} (--approved-by)")
