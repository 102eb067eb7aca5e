"""GitHub client, sticky PR comment, promotion approvals and `llmops pr comment`,
against the fake GitHub REST API in tests/fake_github.py (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fake_github import TOKEN, FakeGitHub
from llmops.errors import LlmopsError
from llmops.gitops import (
    CODEOWNERS_LOCATIONS,
    MAX_COMMENT_CHARS,
    PLAN_MARKER,
    GitHubClient,
    GitHubError,
    GitHubRateLimitError,
    allowed_approvers,
    check_local_approval,
    client_from_env,
    find_codeowners,
    parse_codeowners,
    pr_number_from_env,
    review_pull_request,
    upsert_sticky_comment,
)
from llmops.gitops.codeowners import working_tree_reader

HEAD = "a" * 40
MERGE = "m" * 40
REPO = "acme/support"


@pytest.fixture
def gh():
    fake = FakeGitHub(repo=REPO).start()
    yield fake
    fake.stop()


@pytest.fixture
def client(gh: FakeGitHub) -> GitHubClient:
    return GitHubClient(TOKEN, gh.url, REPO, sleep=_no_sleep, token_env="GITHUB_TOKEN")


def _no_sleep(seconds: float) -> None:
    raise AssertionError(f"unexpected sleep({seconds})")


def merged_pr(gh: FakeGitHub, number: int = 7) -> int:
    gh.add_pr(number, head_sha=HEAD, merge_sha=MERGE)
    return number


# -- approvals of one pull request ---------------------------------------------------------


def review(gh: FakeGitHub, client: GitHubClient, number: int, allowed: list[str]):
    return review_pull_request(client, client.get(client.repo_path(f"pulls/{number}")), allowed)


def test_approved_by_allowed_reviewer_on_head(gh, client):
    n = merged_pr(gh)
    gh.add_review(n, "carol", "COMMENTED")
    gh.add_review(n, "alice", "APPROVED")
    gh.add_review(n, "carol", "COMMENTED")  # a later comment does not undo the approval
    approval = review(gh, client, n, ["@Alice"])
    assert approval.approved, approval.reason
    assert (approval.approver, approval.pr_number, approval.commit) == ("alice", n, HEAD)
    assert f"/repos/{REPO}/pulls/{n}/reviews" in [r.path for r in gh.requests]


def test_approval_before_a_new_commit_does_not_count(gh, client):
    n = merged_pr(gh)
    gh.add_review(n, "alice", "APPROVED")
    gh.push(n, "c" * 40)
    approval = review(gh, client, n, ["alice"])
    assert not approval.approved and approval.rule == "approved after the last commit"
    assert "older commit" in approval.reason and "alice" in approval.reason
    assert approval.commit == "c" * 40
    gh.add_review(n, "alice", "APPROVED")  # re-approval on the new head
    assert review(gh, client, n, ["alice"]).approved


def test_changes_requested_after_approval_blocks(gh, client):
    n = merged_pr(gh)
    gh.add_review(n, "alice", "APPROVED")
    gh.add_review(n, "bob", "CHANGES_REQUESTED")
    approval = review(gh, client, n, ["alice"])
    assert not approval.approved and approval.rule == "no changes requested"
    assert "changes requested by bob" in approval.reason
    gh.add_review(n, "bob", "APPROVED")  # bob's latest word now approves
    assert review(gh, client, n, ["alice"]).approved


def test_approver_who_later_requests_changes_is_not_an_approval(gh, client):
    n = merged_pr(gh)
    gh.add_review(n, "alice", "APPROVED")
    gh.add_review(n, "alice", "CHANGES_REQUESTED")
    assert not review(gh, client, n, ["alice"]).approved


def test_dismissed_approval_does_not_count(gh, client):
    n = merged_pr(gh)
    gh.add_review(n, "alice", "DISMISSED")
    approval = review(gh, client, n, ["alice"])
    assert not approval.approved and "no approving review" in approval.reason


def test_approver_not_allowed(gh, client):
    n = merged_pr(gh)
    gh.add_review(n, "mallory", "APPROVED")
    approval = review(gh, client, n, ["alice", "@acme/ml-leads"])
    assert not approval.approved and approval.rule == "allowed approver from the base"
    assert "mallory" in approval.reason and "alice" in approval.reason
    assert approval.approver is None


def test_self_approval_does_not_count(gh, client):
    n = gh.add_pr(8, head_sha=HEAD, merge_sha=MERGE, author="alice")["number"]
    gh.add_review(n, "alice", "APPROVED")
    approval = review(gh, client, n, ["alice", "bob"])
    assert not approval.approved and approval.rule == "no self-approval"
    assert "only by its author alice" in approval.reason
    gh.add_review(n, "bob", "APPROVED")
    approval = review(gh, client, n, ["alice", "bob"])
    assert approval.approved and approval.approver == "bob"


def test_team_approver(gh, client):
    n = merged_pr(gh)
    gh.set_team("acme", "ml-leads", {"carol": "active", "dave": "pending"})
    gh.add_review(n, "dave", "APPROVED")  # invited, not yet a member
    gh.add_review(n, "erin", "APPROVED")  # not in the team at all (404)
    assert not review(gh, client, n, ["@acme/ml-leads"]).approved
    gh.add_review(n, "carol", "APPROVED")
    approval = review(gh, client, n, ["@acme/ml-leads"])
    assert approval.approved and approval.approver == "carol"
    assert "/orgs/acme/teams/ml-leads/memberships/carol" in [r.path for r in gh.requests]


def test_no_approvers_configured_is_never_approved(gh, client):
    n = merged_pr(gh)
    gh.add_review(n, "alice", "APPROVED")
    pr = client.get(client.repo_path(f"pulls/{n}"))
    gh.requests.clear()
    approval = review_pull_request(client, pr, [])
    assert not approval.approved and "no approvers are configured at the base" in approval.reason
    assert gh.requests == []  # decided without asking GitHub


def test_reviews_are_read_across_pages(gh, client):
    n = merged_pr(gh)
    gh.add_review(n, "alice", "APPROVED")
    for i in range(150):
        gh.add_review(n, f"user{i}", "COMMENTED")
    gh.add_review(n, "bob", "CHANGES_REQUESTED")  # on page 2 of 100
    approval = review(gh, client, n, ["alice"])
    assert not approval.approved and "bob" in approval.reason
    pages = [r for r in gh.requests if r.path.endswith("/reviews")]
    assert [r.query.get("page", ["1"])[0] for r in pages] == ["1", "2"]


def test_fake_answers_the_shapes_promotions_read(gh, client):
    """The endpoints `llmops.gitops.promotion` reads, in GitHub's documented shapes."""
    gh.default_branch = "trunk"
    gh.add_pr(4, head_sha=HEAD, merge_sha=MERGE, base_ref="experiment", base_sha="e" * 40, commits=["c" * 40, HEAD])
    assert client.repository()["default_branch"] == "trunk"
    (pull,) = client.get_paginated(client.repo_path(f"commits/{'c' * 40}/pulls"))
    assert (pull["number"], pull["base"]["ref"], pull["base"]["sha"]) == (4, "experiment", "e" * 40)
    assert pull["merge_commit_sha"] == MERGE and pull["user"]["login"] == "dev"
    commits = client.get_paginated(client.repo_path("pulls/4/commits"))
    assert [c["sha"] for c in commits] == ["c" * 40, HEAD]


# -- errors and rate limits -----------------------------------------------------------------


def test_server_error_raises_clear_message_and_never_approves(gh, client):
    n = merged_pr(gh)
    gh.add_review(n, "alice", "APPROVED")
    gh.fail("GET", rf"/repos/{REPO}/pulls/{n}/reviews", 502, "Server Error")
    with pytest.raises(GitHubError) as err:
        review(gh, client, n, ["alice"])
    msg = str(err.value)
    assert f"GET /repos/{REPO}/pulls/{n}/reviews" in msg and "HTTP 502" in msg and "re-run later" in msg
    assert isinstance(err.value, LlmopsError) and err.value.status == 502


def test_bad_token(gh):
    bad = GitHubClient("wrong-token", gh.url, REPO)
    with pytest.raises(GitHubError, match="401.*Bad credentials.*GITHUB_TOKEN"):
        bad.get(f"/repos/{REPO}/pulls/1")


def test_not_found_names_the_endpoint(gh, client):
    with pytest.raises(GitHubError, match=rf"GET /repos/{REPO}/pulls/99 failed: HTTP 404.*GITHUB_REPOSITORY"):
        client.get(client.repo_path("pulls/99"))


def test_primary_rate_limit(gh, client):
    merged_pr(gh)
    gh.rate_limit("GET", rf"/repos/{REPO}/commits/\w+/pulls")
    with pytest.raises(GitHubRateLimitError) as err:
        client.get_paginated(client.repo_path(f"commits/{MERGE}/pulls"))
    assert "rate limit" in str(err.value) and f"/repos/{REPO}/commits/{MERGE}/pulls" in str(err.value)
    assert "Nothing was approved" in str(err.value)
    assert err.value.retry_after is not None and err.value.retry_after > 60  # reset in an hour


def test_secondary_rate_limit_with_long_retry_after_raises_without_waiting(gh, client):
    gh.rate_limit("GET", r".*/pulls/\d+", retry_after=120)
    merged_pr(gh)
    with pytest.raises(GitHubRateLimitError, match="HTTP 429.*retry in 120 s"):
        client.get(client.repo_path("pulls/7"))


def test_short_retry_after_is_waited_once_then_retried(gh):
    waits: list[float] = []
    client = GitHubClient(TOKEN, gh.url, REPO, max_retry_wait=5, sleep=waits.append)
    merged_pr(gh)
    gh.rate_limit("GET", r".*/pulls/7", retry_after=2)
    assert client.get(client.repo_path("pulls/7"))["number"] == 7
    assert waits == [2.0]
    gh.rate_limit("GET", r".*/pulls/7", retry_after=1, times=2)
    with pytest.raises(GitHubRateLimitError):
        client.get(client.repo_path("pulls/7"))


def test_next_link_to_another_host_is_refused(gh, client):
    gh.fail(
        "GET",
        rf"/repos/{REPO}/issues/1/comments",
        200,
        headers={"Link": '<https://evil.example/steal?page=2>; rel="next"'},
        body=[],
    )
    with pytest.raises(GitHubError, match="refusing to send the token"):
        client.get_paginated(client.repo_path("issues/1/comments"))


def test_unreachable_api(tmp_path):
    client = GitHubClient(TOKEN, "http://127.0.0.1:9", REPO, timeout=5)
    with pytest.raises(GitHubError, match="Cannot reach the GitHub API.*GITHUB_API_URL"):
        client.get("/rate_limit")


def test_a_dripping_api_is_cut_off_at_the_deadline():
    """A server that sends its body one byte at a time, each within the read timeout."""
    import socket
    import threading
    import time

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()

    def drip() -> None:
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        while not stop.is_set():
            try:
                conn.sendall(b" ")
            except OSError:
                break
            time.sleep(0.2)
        conn.close()

    threading.Thread(target=drip, daemon=True).start()
    client = GitHubClient(TOKEN, f"http://127.0.0.1:{srv.getsockname()[1]}", REPO, timeout=1, deadline=1)
    start = time.monotonic()
    try:
        with pytest.raises(GitHubError, match=r"took more than 1s in all"):
            client.get("/rate_limit")
        took = time.monotonic() - start
        assert took < 10, took
    finally:
        stop.set()
        srv.close()


def test_api_url_password_is_not_printed():
    client = GitHubClient(TOKEN, "http://user:hunter2@127.0.0.1:9", REPO, timeout=2)
    with pytest.raises(GitHubError) as info:
        client.get("/rate_limit")
    assert "hunter2" not in str(info.value) and "127.0.0.1:9" in str(info.value)


# -- sticky comment -------------------------------------------------------------------------


def test_comment_created_then_updated_in_place(gh, client):
    n = merged_pr(gh)
    gh.add_comment(n, "LGTM")
    gh.add_comment(n, f"> quoting\n{PLAN_MARKER}")  # a person quoting the marker is not ours
    action, first = upsert_sticky_comment(client, n, "plan v1")
    assert action == "created"
    action, second = upsert_sticky_comment(client, n, "plan v2")
    assert (action, second) == ("updated", first)
    ours = [c for c in gh.issue_comments(n) if c["id"] == first]
    assert len(gh.issue_comments(n)) == 3
    assert ours[0]["body"] == f"{PLAN_MARKER}\nplan v2"


def test_marker_comment_by_another_user_is_left_alone(gh, client):
    n = merged_pr(gh)
    theirs = gh.add_comment(n, f"{PLAN_MARKER}\nmy own notes, not a plan", login="mallory")
    action, ours = upsert_sticky_comment(client, n, "plan v1")
    assert action == "created" and ours != theirs["id"]
    action, again = upsert_sticky_comment(client, n, "plan v2")
    assert (action, again) == ("updated", ours)
    by_id = {c["id"]: c for c in gh.issue_comments(n)}
    assert by_id[theirs["id"]]["body"] == f"{PLAN_MARKER}\nmy own notes, not a plan"  # untouched
    assert by_id[ours]["body"] == f"{PLAN_MARKER}\nplan v2" and by_id[ours]["user"]["login"] == "github-actions[bot]"
    assert not [r for r in gh.requests if r.method == "PATCH" and r.path.endswith(f"/{theirs['id']}")]
    # and GitHub itself refuses the edit, as the fake does:
    with pytest.raises(GitHubError, match="403"):
        client.patch(client.repo_path(f"issues/comments/{theirs['id']}"), {"body": "hijacked"})


def test_token_login(gh):
    actions = GitHubClient(TOKEN, gh.url, REPO, token_env="GITHUB_TOKEN")
    assert actions.login({}) == "github-actions[bot]"  # GET /user: 403 for an installation token
    assert "/user" in [r.path for r in gh.requests]
    app = GitHubClient(TOKEN, gh.url, REPO, token_env="LLMOPS_GITHUB_TOKEN")
    with pytest.raises(GitHubError, match="LLMOPS_GITHUB_LOGIN"):
        app.login({})
    assert app.login({"LLMOPS_GITHUB_LOGIN": "acme-llmops[bot]"}) == "acme-llmops[bot]"
    gh.user_endpoint, gh.login = True, "octo-ci"  # a user's token says who it is
    assert app.login({}) == "octo-ci"
    _, cid = upsert_sticky_comment(app, merged_pr(gh), "plan")
    assert next(c for c in gh.issue_comments(7) if c["id"] == cid)["user"]["login"] == "octo-ci"


def test_sticky_comment_found_on_a_later_page(gh, client):
    n = merged_pr(gh)
    for i in range(120):
        gh.add_comment(n, f"chatter {i}")
    _, cid = upsert_sticky_comment(client, n, "plan")
    for i in range(90):
        gh.add_comment(n, f"more chatter {i}")
    action, again = upsert_sticky_comment(client, n, "plan 2")
    assert (action, again) == ("updated", cid)
    assert sum(1 for c in gh.issue_comments(n) if c["body"].startswith(PLAN_MARKER)) == 1


def test_long_body_is_bounded_to_one_comment(gh, client):
    n = merged_pr(gh)
    body = "\n".join(f"| finetunes.m{i} | replace | lr 0.0002 -> 0.0001 |" for i in range(3000))
    assert len(body) > MAX_COMMENT_CHARS
    _, cid = upsert_sticky_comment(client, n, body)
    stored = next(c["body"] for c in gh.issue_comments(n) if c["id"] == cid)
    assert len(stored) <= MAX_COMMENT_CHARS
    assert stored.startswith(PLAN_MARKER) and "Truncated" in stored
    assert "| finetunes.m0 |" in stored


def test_comment_permission_error_is_clear(gh, client):
    n = merged_pr(gh)
    gh.fail("POST", rf"/repos/{REPO}/issues/{n}/comments", 403, "Resource not accessible by integration")
    with pytest.raises(GitHubError, match="403.*Resource not accessible.*pull-requests: write"):
        upsert_sticky_comment(client, n, "plan")


# -- who may approve ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codeowners", "path", "owners"),
    [
        ("* @acme/everyone\n", "llmops.yaml", ["@acme/everyone"]),
        ("*  @a\nllmops.yaml @acme/ml-leads @bob\n", "llmops.yaml", ["@acme/ml-leads", "@bob"]),
        ("llmops.yaml @bob\n* @a\n", "llmops.yaml", ["@a"]),  # last match wins
        ("/llmops.yaml @root\n", "sub/llmops.yaml", []),  # anchored to the root
        ("llmops.yaml @any\n", "sub/llmops.yaml", ["@any"]),  # unanchored: any depth
        ("*.yaml @yaml # comment\n", "llmops.yaml", ["@yaml"]),
        ("# llmops.yaml @commented\n", "llmops.yaml", []),
        ("/ml/ @ml\n", "ml/llmops.yaml", ["@ml"]),
        ("/ml/ @ml\n", "llmops.yaml", []),
        ("docs/** @docs\n**/llmops.yaml @deep\n", "a/b/llmops.yaml", ["@deep"]),
        ("llmops.yaml @x\nllmops.yaml\n", "llmops.yaml", []),  # a later line with no owners unsets them
        # GitHub's documented examples (about-code-owners):
        ("docs/* @docs\n", "docs/getting-started.md", ["@docs"]),
        ("docs/* @docs\n", "docs/build-app/troubleshooting.md", []),  # `/*`: direct children only
        ("/* @top\n", "src/a.py", []),
        ("/* @top\n", "README.md", ["@top"]),
        ("apps/ @apps\n", "x/apps/y/z.js", ["@apps"]),  # a folder anywhere, and all below it
        ("/docs/ @docs\n", "docs/sub/a.md", ["@docs"]),
        ("**/logs @logs\n", "deeply/nested/logs/x.log", ["@logs"]),
        ("/apps/ @octo\n/apps/github\n", "apps/github/a.rb", []),
        ("/apps/ @octo\n/apps/github\n", "apps/other/a.rb", ["@octo"]),
        ("!llmops.yaml @neg\n", "llmops.yaml", []),  # negation is not supported by GitHub
        ("llmops.[y]aml @range\n", "llmops.yaml", []),  # nor character ranges
    ],
)
def test_parse_codeowners(codeowners, path, owners):
    assert parse_codeowners(codeowners, path) == owners


def test_codeowners_lookup_order(tmp_path: Path):
    read = working_tree_reader(tmp_path)
    assert find_codeowners(read) is None
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "CODEOWNERS").write_text("* @docs\n")
    assert find_codeowners(read) == ("docs/CODEOWNERS", "* @docs\n")
    (tmp_path / "CODEOWNERS").write_text("* @root\n")
    assert find_codeowners(read)[0] == "CODEOWNERS"
    (tmp_path / ".github").mkdir()
    (tmp_path / ".github" / "CODEOWNERS").write_text("* @github\n")
    assert find_codeowners(read)[0] == ".github/CODEOWNERS"  # first found wins
    assert CODEOWNERS_LOCATIONS == (".github/CODEOWNERS", "CODEOWNERS", "docs/CODEOWNERS")


def test_allowed_approvers_precedence(tmp_path: Path):
    (tmp_path / ".github").mkdir()
    (tmp_path / ".github" / "CODEOWNERS").write_text("/ml/llmops.yaml @acme/ml-leads\n")
    assert allowed_approvers({}, {}, tmp_path, "ml/llmops.yaml") == ["@acme/ml-leads"]  # repository-relative
    assert allowed_approvers({}, {}, tmp_path, "llmops.yaml") == []
    assert allowed_approvers({}, {"approvers": ["bob"]}, tmp_path) == ["bob"]
    assert allowed_approvers({"approvers": ["eve"]}, {"approvers": ["bob"]}, tmp_path) == ["eve"]
    (tmp_path / ".github" / "CODEOWNERS").unlink()
    assert allowed_approvers({}, {}, tmp_path, "ml/llmops.yaml") == []


def test_local_approval():
    refused = check_local_approval("alice", {}, ["alice"])
    assert not refused.approved and "allow_local_approvals" in refused.reason
    allowed = check_local_approval("alice", {"allow_local_approvals": True}, ["@alice", "@acme/leads"])
    assert allowed.approved and allowed.approver == "alice" and allowed.source == "local"
    other = check_local_approval("mallory", {"allow_local_approvals": True}, ["alice", "@acme/leads"])
    assert not other.approved and "team membership cannot be checked locally" in other.reason
    assert check_local_approval("anyone", {"allow_local_approvals": True}, []).approved


# -- environment and CLI ------------------------------------------------------------------


def _event(tmp_path: Path, payload: dict) -> str:
    path = tmp_path / "event.json"
    path.write_text(json.dumps(payload))
    return str(path)


def test_pr_number_from_event(tmp_path: Path):
    assert pr_number_from_env({"GITHUB_EVENT_PATH": _event(tmp_path, {"pull_request": {"number": 42}})}) == 42
    with pytest.raises(LlmopsError, match="--pr N"):
        pr_number_from_env({"GITHUB_EVENT_PATH": _event(tmp_path, {"ref": "refs/heads/main"})})
    with pytest.raises(LlmopsError, match="--pr N"):
        pr_number_from_env({})


def test_client_from_env():
    client = client_from_env({"GITHUB_TOKEN": "ghs_secret123", "GITHUB_REPOSITORY": "o/r"})
    assert (client.api_url, client.repo, client.token) == ("https://api.github.com", "o/r", "ghs_secret123")
    assert "ghs_secret123" not in repr(client)
    override = client_from_env(
        {"GITHUB_TOKEN": "a", "LLMOPS_GITHUB_TOKEN": "b"},
        {"github": {"repository": "x/y", "api_url": "https://ghe.example/api/v3"}},
    )
    assert (override.token, override.repo, override.api_url) == ("b", "x/y", "https://ghe.example/api/v3")
    assert (override.token_env, client.token_env) == ("LLMOPS_GITHUB_TOKEN", "GITHUB_TOKEN")
    # Nor may it have approvals read from a repository whose reviews it controls:
    env = {"GITHUB_TOKEN": "t", "GITHUB_REPOSITORY": "o/r"}
    assert client_from_env(env, {"github": {"repository": "attacker/fork"}}).repo == "o/r"
    # A pull request's llmops.yaml must not send the token elsewhere when Actions names the API:
    pr_config = {"github": {"api_url": "https://attacker.example/api"}}
    env = {"GITHUB_TOKEN": "t", "GITHUB_REPOSITORY": "o/r", "GITHUB_API_URL": "https://api.github.com"}
    assert client_from_env(env, pr_config).api_url == "https://api.github.com"
    with pytest.raises(GitHubError, match="GITHUB_REPOSITORY"):
        client_from_env({"GITHUB_TOKEN": "t"})
    with pytest.raises(GitHubError, match="GITHUB_TOKEN"):
        client_from_env({"GITHUB_REPOSITORY": "o/r"})


def test_cli_pr_comment_creates_then_updates(gh, tmp_path: Path, monkeypatch):
    from llmops.cli.gitops import pr_group

    n = merged_pr(gh, 12)
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    monkeypatch.setenv("GITHUB_REPOSITORY", REPO)
    monkeypatch.setenv("GITHUB_API_URL", gh.url)
    monkeypatch.setenv("GITHUB_EVENT_PATH", _event(tmp_path, {"pull_request": {"number": n}}))
    monkeypatch.delenv("LLMOPS_GITHUB_TOKEN", raising=False)
    body = tmp_path / "plan.md"
    body.write_text("## Plan\n~ finetunes.support-lora -> replace\n")
    runner = CliRunner()
    first = runner.invoke(pr_group, ["comment", "--body-file", str(body)])
    assert first.exit_code == 0, first.output
    assert "created comment" in first.output and f"#{n}" in first.output
    body.write_text("## Plan\nNo changes.\n")
    second = runner.invoke(pr_group, ["comment", "--body-file", str(body), "--pr", str(n)])
    assert second.exit_code == 0, second.output
    assert "updated comment" in second.output
    comments = gh.issue_comments(n)
    assert len(comments) == 1 and comments[0]["body"] == f"{PLAN_MARKER}\n## Plan\nNo changes.\n"

    missing = runner.invoke(pr_group, ["comment", "--body-file", str(tmp_path / "nope.md")])
    assert isinstance(missing.exception, LlmopsError) and "nope.md" in str(missing.exception)


def test_cli_pr_comment_from_a_saved_plan(gh, tmp_path: Path, monkeypatch):
    """`llmops pr comment --plan FILE` renders a saved plan (from `llmops plan --out`) as the comment."""
    from llmops.cli.gitops import pr_group
    from llmops.engine.plan import Plan, ResourceChange
    from llmops.engine.planfile import save_plan

    n = merged_pr(gh, 13)
    for key, value in {"GITHUB_TOKEN": TOKEN, "GITHUB_REPOSITORY": REPO, "GITHUB_API_URL": gh.url}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LLMOPS_GITHUB_TOKEN", raising=False)
    plan_file = tmp_path / "plan.bin"
    save_plan(Plan([ResourceChange("finetunes.support-lora", "replace",
                                   ["training.learning_rate: 0.0002 -> 0.0001"])]), plan_file)
    runner = CliRunner()
    res = runner.invoke(pr_group, ["comment", "--plan", str(plan_file), "--pr", str(n)])
    assert res.exit_code == 0, res.output
    (comment,) = gh.issue_comments(n)
    assert comment["body"].startswith(PLAN_MARKER)
    assert "**Plan: 0 to create, 1 to replace, 0 to update, 0 to delete.**" in comment["body"]
    assert "training.learning_rate: 0.0002 -> 0.0001" in comment["body"]
    both = runner.invoke(pr_group, ["comment", "--plan", str(plan_file), "--body-file", str(plan_file)])
    assert both.exit_code != 0 and "exactly one of --body-file or --plan" in both.output


# -- promotion rules over a real git history (no apply: tests/test_approval_bypass.py does that) --


def _git(cwd: Path, *args: str) -> str:
    import subprocess

    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


PROMO_CONFIG = """\
version: 1
project: promo
datasets:
  tickets: {source: data/t.jsonl}
prompts:
  support: {template: prompts/support.j2}
finetunes:
  lora: {dataset: tickets, prompt: support}
  other: {dataset: tickets, training: {max_steps: 1}}
evals:
  quality: {model: lora, dataset: tickets, metrics: [{name: score, python: "metrics.custom:score"}]}
"""
PROMO_DEPLOYMENT = "deployments:\n  prod: {model: lora, gates: [quality], approval: required}\n"


def _promotion_repo(tmp_path: Path) -> tuple[Path, Path, str]:
    top, root = tmp_path / "repo", tmp_path / "repo" / "ml"
    for rel, text in {"ml/llmops.yaml": PROMO_CONFIG, "ml/data/t.jsonl": "{}\n", "ml/prompts/support.j2": "{{ q }}",
                      "ml/prompts/parts/footer.j2": "thanks", "ml/metrics/custom.py": "def score(): ...\n",
                      ".github/CODEOWNERS": "* @carol\n/ml/ @alice\n"}.items():
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_text(text)
    _git(top, "init", "-q", "-b", "main")
    _git(top, "add", "-A")
    _git(top, "commit", "-q", "-m", "init")
    return top, root, _git(top, "rev-parse", "HEAD")


def _request(root: Path, sha: str, applied: str | None = None):
    from llmops.config.document import parse_document
    from llmops.gitops import PromotionRequest

    config = parse_document((root / "llmops.yaml").read_text(), "llmops.yaml").data
    return PromotionRequest(root, "prod", config, sha, applied_commit=applied)


def test_deployment_inputs_follow_references_and_named_files(tmp_path: Path):
    from llmops.gitops import deployment_inputs

    _, root, _ = _promotion_repo(tmp_path)
    (root / "llmops.yaml").write_text(PROMO_CONFIG + PROMO_DEPLOYMENT)
    from llmops.config.document import parse_document

    data = parse_document((root / "llmops.yaml").read_text(), "llmops.yaml").data
    addresses, files = deployment_inputs(data, "prod", root)
    assert addresses == {"deployments.prod", "finetunes.lora", "datasets.tickets", "prompts.support", "evals.quality"}
    # a prompt may include files from its template's folder; a custom metric is a module file
    assert files == ["data/t.jsonl", "metrics/custom.py", "prompts", "prompts/support.j2"]
    # data that DVC tracks: git holds the pointer (the file itself may not even be pulled)
    (root / "data" / "t.jsonl").unlink()
    (root / "data" / "t.jsonl.dvc").write_text("outs: [{md5: 0, path: t.jsonl}]\n")
    assert deployment_inputs(data, "prod", root)[1][:2] == ["data/t.jsonl", "data/t.jsonl.dvc"]


def test_promotion_through_a_merge_commit_then_changes_outside_the_deployment(tmp_path: Path, gh, client):
    from llmops.gitops import check_promotion

    top, root, first = _promotion_repo(tmp_path)
    _git(top, "checkout", "-q", "-b", "protect")
    (root / "llmops.yaml").write_text(PROMO_CONFIG + PROMO_DEPLOYMENT)
    _git(top, "commit", "-q", "-am", "protect prod")
    branch = _git(top, "rev-parse", "HEAD")
    _git(top, "checkout", "-q", "main")
    _git(top, "merge", "-q", "--no-ff", "-m", "Merge pull request #1", "protect")
    merge = _git(top, "rev-parse", "HEAD")
    gh.add_pr(1, head_sha=branch, merge_sha=merge, base_sha=first)
    gh.add_review(1, "alice", "APPROVED")
    # Untracked files llmops writes in the project folder do not make the tree dirty.
    for rel in (".llmops/mlflow.db", "dvc.yaml", "dvc.lock", "llmops.lock"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")

    approval = check_promotion(client, _request(root, merge))  # first promotion: since #1 protected it
    assert approval.approved, approval.reason
    assert (approval.approver, approval.pr_number, approval.commit, approval.applied_commit) == ("alice", 1, branch, merge)
    asked = [r.path for r in gh.requests]
    assert f"/repos/{REPO}/commits/{branch}/pulls" in asked and f"/repos/{REPO}/pulls/1/commits" in asked
    assert f"/repos/{REPO}/commits/{first}/pulls" not in asked  # before the deployment was protected

    # An unrelated fine-tune changed without review: nothing the deployment depends on moved.
    (root / "llmops.yaml").write_text((root / "llmops.yaml").read_text().replace("max_steps: 1", "max_steps: 2"))
    _git(top, "commit", "-q", "-am", "tune other")
    other = _git(top, "rev-parse", "HEAD")
    gh.requests.clear()
    approval = check_promotion(client, _request(root, other, applied=merge))
    assert approval.approved and "nothing deployments.prod depends on changed" in approval.reason
    assert not [r for r in gh.requests if "/pulls" in r.path]

    # A prompt include pushed without review does.
    (root / "prompts" / "parts" / "footer.j2").write_text("send us your password")
    _git(top, "commit", "-q", "-am", "footer")
    footer = _git(top, "rev-parse", "HEAD")
    approval = check_promotion(client, _request(root, footer, applied=merge))
    assert not approval.approved and approval.rule == "merged pull request"
    assert f"commit {footer[:12]} changed the deployment without a pull request" in approval.reason

    # And an untracked file in the project is an unreviewed change.
    (root / "notes.txt").write_text("x")
    approval = check_promotion(client, _request(root, footer, applied=merge))
    assert not approval.approved and "(?? ml/notes.txt)" in approval.reason
