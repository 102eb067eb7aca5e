"""Approvals of one pull request: who may approve (config / CODEOWNERS) and whether they did.

`review_pull_request` reads a pull request's reviews from the GitHub REST API: approved means
an allowed reviewer other than the author approved its last commit (review `commit_id` == head
sha) and no reviewer's latest word is "changes requested". Which commits and pull requests a
promotion must check, and where the allowed reviewers are read (the base commit), is
`llmops.gitops.promotion`. `check_local_approval` handles `--approved-by` outside GitHub.
Nothing here approves on doubt: an API failure raises `GitHubError`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from llmops.gitops.codeowners import find_codeowners, parse_codeowners, working_tree_reader
from llmops.gitops.github import GitHubClient, GitHubError

_DECISIVE = ("APPROVED", "CHANGES_REQUESTED", "DISMISSED")

# The rules a protected promotion must meet; a refusal names one of them.
RULE_CLEAN_TREE = "clean working tree"
RULE_HEAD = "HEAD is GITHUB_SHA"
RULE_MERGED_PR = "merged pull request"
RULE_DEFAULT_BRANCH = "merged into the default branch"
RULE_APPROVER = "allowed approver from the base"
RULE_AFTER_LAST_COMMIT = "approved after the last commit"
RULE_CHANGES_REQUESTED = "no changes requested"
RULE_SELF_APPROVAL = "no self-approval"


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
    rule: str = ""  # the rule that refused it (empty when approved)
    applied_commit: str | None = None  # the checked-out commit the promotion applies (GitHub only)
    pull_requests: list[int] = field(default_factory=list)  # every PR checked, newest first

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- who may approve ----------------------------------------------------------------------


def approvers_in(deployment: Any, settings: Any) -> list[str]:
    """deployments.X.approvers, else settings.approvers (empty when neither names anyone)."""
    for source in (deployment, settings):
        if isinstance(source, Mapping) and isinstance(source.get("approvers"), list) and source["approvers"]:
            return [str(a) for a in source["approvers"]]
    return []


def allowed_approvers(
    deployment: Mapping[str, Any], settings: Mapping[str, Any], repo_root: Path, config_path: str = "llmops.yaml"
) -> list[str]:
    """Approvers from the checked-out files: the config's, else the CODEOWNERS owners of the
    config (`config_path` is repository-relative). Only `--approved-by` uses this; GitHub
    approvals read the same rules at each pull request's base commit instead."""
    named = approvers_in(deployment, settings)
    if named:
        return named
    found = find_codeowners(working_tree_reader(repo_root))
    return parse_codeowners(found[1], config_path) if found else []


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


def review_pull_request(client: GitHubClient, pr: Mapping[str, Any], allowed: list[str]) -> Approval:
    """Did one of `allowed`, other than its author, approve pull request `pr` (GitHub's pull
    object) on its last commit, with no reviewer's latest word being "changes requested"?

    Raises GitHubError when GitHub cannot be asked; never returns approved on an error.
    """
    number, head = int(pr["number"]), str(pr["head"]["sha"])
    author = str((pr.get("user") or {}).get("login") or "")
    if not allowed:
        return Approval(False, pr_number=number, commit=head, rule=RULE_APPROVER, reason=(
            f"no approvers are configured at the base of pull request #{number}: set "
            "deployments.NAME.approvers or settings.approvers, or add a CODEOWNERS line for llmops.yaml, "
            "in a reviewed pull request merged before this one"))
    latest = _latest_decisive(client.get_paginated(client.repo_path(f"pulls/{number}/reviews")))
    blockers = sorted(r["user"]["login"] for r in latest.values() if r["state"] == "CHANGES_REQUESTED")
    if blockers:
        return Approval(False, pr_number=number, commit=head, rule=RULE_CHANGES_REQUESTED, reason=(
            f"pull request #{number} has changes requested by {', '.join(blockers)}; resolve them and "
            "get a new approval (or have the request dismissed)"))
    approvals = sorted((r for r in latest.values() if r["state"] == "APPROVED"),
                       key=lambda r: r.get("submitted_at") or "", reverse=True)
    current = [r for r in approvals if r.get("commit_id") == head]
    users, teams = _split_allowed(allowed)
    self_approved = False
    for review in current:
        login = review["user"]["login"]
        if login.lower() == author.lower():
            self_approved = self_approved or login.lower() in users or _in_any_team(client, teams, login)
            continue
        if login.lower() in users or _in_any_team(client, teams, login):
            return Approval(True, approver=login, pr_number=number, commit=head,
                            reason=f"approved by {login} on pull request #{number} at {head[:12]}")
    who = ", ".join(allowed)
    if self_approved:
        return Approval(False, pr_number=number, commit=head, rule=RULE_SELF_APPROVAL, reason=(
            f"pull request #{number} was approved only by its author {author}; a promotion needs the "
            f"approval of someone else: ask one of {who}"))
    return Approval(False, pr_number=number, commit=head, **_why_not(number, head, current, approvals, who))


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


def _why_not(number: int, head: str, current: list[dict], approvals: list[dict], who: str) -> dict[str, str]:
    stale = [r for r in approvals if r.get("commit_id") != head]
    if current:
        names = ", ".join(sorted(r["user"]["login"] for r in current))
        return {"rule": RULE_APPROVER, "reason": f"pull request #{number} was approved by {names}, who may not "
                f"approve this promotion (the allowed approvers come from the base of the pull request, "
                f"not from its changes); ask one of: {who}"}
    if stale:
        names = ", ".join(sorted(r["user"]["login"] for r in stale))
        return {"rule": RULE_AFTER_LAST_COMMIT, "reason": f"approval of pull request #{number} by {names} was "
                f"for an older commit; commits were pushed after it (head {head[:12]}): ask one of {who} to "
                "approve the last commit"}
    return {"rule": RULE_APPROVER, "reason": f"pull request #{number} has no approving review; ask one of: {who}"}


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
