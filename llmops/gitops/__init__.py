"""GitOps: talking to GitHub for pull-request comments and promotion approvals.

- `github`: the REST client (pagination, errors, rate limits), standard library only.
- `comments`: the sticky plan comment on a pull request.
- `approval`: who may approve a protected promotion and whether they did.

Project scaffolding (`llmops init`) lives in `llmops.scaffold`; the click commands in
`llmops.cli.gitops`. Nothing here prints or imports click.
"""

from __future__ import annotations

from llmops.gitops.approval import (
    Approval,
    allowed_approvers,
    check_approval,
    check_local_approval,
    find_codeowners,
    parse_codeowners,
)
from llmops.gitops.comments import (
    MAX_COMMENT_CHARS,
    PLAN_MARKER,
    StickyComment,
    bound_body,
    comment_on_pr,
    pr_number_from_env,
    upsert_sticky_comment,
)
from llmops.gitops.github import GitHubClient, GitHubError, GitHubRateLimitError, client_from_env

__all__ = [
    "Approval",
    "GitHubClient",
    "GitHubError",
    "GitHubRateLimitError",
    "MAX_COMMENT_CHARS",
    "PLAN_MARKER",
    "StickyComment",
    "allowed_approvers",
    "bound_body",
    "check_approval",
    "check_local_approval",
    "client_from_env",
    "comment_on_pr",
    "find_codeowners",
    "parse_codeowners",
    "pr_number_from_env",
    "upsert_sticky_comment",
]
