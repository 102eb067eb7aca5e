"""GitOps: talking to GitHub for pull-request comments and promotion approvals.

- `github`: the REST client (pagination, errors, rate limits, the token's own login),
  standard library only.
- `comments`: the sticky plan comment on a pull request (only our own comment is updated).
- `codeowners`: CODEOWNERS as GitHub reads it (lookup order, gitwildmatch via pathspec).
- `gitrepo`: the git checkout an apply runs in (status, history, files at a commit).
- `approval`: who may approve and whether one pull request's reviews approve it.
- `promotion`: the rules a protected promotion must meet, over git history and GitHub.

Project scaffolding (`llmops init`) lives in `llmops.scaffold`; the click commands in
`llmops.cli.gitops`. Nothing here prints or imports click.
"""

from __future__ import annotations

from llmops.gitops.approval import (
    Approval,
    allowed_approvers,
    check_local_approval,
    review_pull_request,
)
from llmops.gitops.codeowners import CODEOWNERS_LOCATIONS, find_codeowners, parse_codeowners
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
from llmops.gitops.promotion import PromotionRequest, check_local_promotion, check_promotion, deployment_inputs

__all__ = [
    "Approval",
    "CODEOWNERS_LOCATIONS",
    "GitHubClient",
    "GitHubError",
    "GitHubRateLimitError",
    "MAX_COMMENT_CHARS",
    "PLAN_MARKER",
    "PromotionRequest",
    "StickyComment",
    "allowed_approvers",
    "bound_body",
    "check_local_approval",
    "check_local_promotion",
    "check_promotion",
    "client_from_env",
    "comment_on_pr",
    "deployment_inputs",
    "find_codeowners",
    "parse_codeowners",
    "pr_number_from_env",
    "review_pull_request",
    "upsert_sticky_comment",
]
