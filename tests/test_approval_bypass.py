"""Attempts to promote a protected deployment without the review it needs, through the real
`llmops apply`, a real git repository (the project in its `ml/` sub-folder) and the fake GitHub
REST API on 127.0.0.1 (tests/fake_github.py, documented shapes). MLflow, DVC and training are real.

The upstream resources are trained and evaluated once per module, and the deployment promoted
once through an approved pull request (#1, the first promotion: no applied commit in the lock
yet). Every case then starts again from that commit and lock, makes its commits and pull
requests, and runs one apply, which only has the deployment left to do. Each bypass exits 1,
says which rule refused it, and promotes nothing: the lock keeps its bytes and no alias moves.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import Project
from fake_github import TOKEN, FakeGitHub

pytestmark = pytest.mark.slow

REPO = "acme/support"
CONFIG = "ml/llmops.yaml"

UPSTREAM = """\
version: 1
project: bypass
datasets:
  tickets:
    source: data/tickets.jsonl
    prepare: [{split: {eval_fraction: 0.1, seed: 13}}]
prompts:
  support: {template: prompts/support.j2, variables: [question]}
base_models:
  tiny: {build: {architecture: llama, hidden_size: 32, layers: 1, heads: 2, intermediate_size: 64, tokenizer_from: tickets}}
finetunes:
  lora: {base_model: tiny, dataset: tickets, prompt: support, training: {max_steps: 4, batch_size: 4, max_seq_length: 64}}
evals:
  quality: {model: lora, dataset: tickets, metrics: [perplexity], decoding: {max_new_tokens: 2}, limit: 4}
"""
# Protected, no approvers named: CODEOWNERS at the repository root decides (alice for the config).
DEPLOYMENT = "deployments:\n  prod: {model: lora, alias: production, gates: [quality], approval: required}\n"
CODEOWNERS = "* @carol\n/ml/llmops.yaml @alice\ndocs/* @docs-team\n"


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _fake_sha(label: str) -> str:
    """A PR branch's head commit: GitHub knows it, this clone need not (squash merges)."""
    return hashlib.sha1(label.encode()).hexdigest()


@dataclass
class Repo:
    top: Path
    project: Project
    promoted: str  # commit of the first promotion (PR #1)
    lock: str  # llmops.lock right after it
    model_name: str

    def commit(self, message: str, edits: dict[str, str]) -> str:
        for rel, text in edits.items():
            (self.top / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.top / rel).write_text(text)
        _git(self.top, "add", *edits)
        _git(self.top, "commit", "-q", "-m", message)
        return _git(self.top, "rev-parse", "HEAD")

    def config(self, old: str = "alias: production", new: str = "alias: staging") -> dict[str, str]:
        text = (self.top / CONFIG).read_text()
        assert old in text
        return {CONFIG: text.replace(old, new)}

    def apply(self, gh: FakeGitHub, sha: str, *, subprocess: bool = False):
        """`llmops apply` in CI on `sha`: in a fresh interpreter with `subprocess` (one that
        starts a model server, which outlives the command as a user's would)."""
        env = {"GITHUB_TOKEN": TOKEN, "LLMOPS_GITHUB_TOKEN": "", "GITHUB_REPOSITORY": REPO,
               "GITHUB_API_URL": gh.url, "GITHUB_SHA": sha}
        return self.project.run("apply", "--auto-approve", env=env, subprocess=subprocess)

    def registry(self):
        from mlflow import MlflowClient

        return MlflowClient(f"sqlite:///{self.project.root / '.llmops' / 'mlflow.db'}")

    def aliases(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.registry().get_registered_model(self.model_name).aliases.items()}


def pull(gh: FakeGitHub, number: int, merge: str, base: str, *, author: str = "dev", base_ref: str = "main",
         reviews: tuple[tuple[str, str], ...] = (("alice", "APPROVED"),)) -> str:
    """PR `number` squash-merged as commit `merge` on top of `base`, reviewed on its head."""
    head = _fake_sha(f"pr-{number}-head")
    gh.add_pr(number, head_sha=head, merge_sha=merge, author=author, base_ref=base_ref, base_sha=base)
    for login, state in reviews:
        gh.add_review(number, login, state, commit_id=head)
    return head


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory):
    top = tmp_path_factory.mktemp("bypass") / "repo"
    (top / "ml").mkdir(parents=True)
    project = Project(top / "ml").copy_example()
    project.write({"llmops.yaml": UPSTREAM})
    (top / ".github").mkdir()
    (top / ".github" / "CODEOWNERS").write_text(CODEOWNERS)
    (top / "README.md").write_text("# support\n")
    _git(top, "init", "-q", "-b", "main")
    _git(top, "add", "-A")
    _git(top, "commit", "-q", "-m", "llmops init")  # pushed directly: nothing protected yet
    root = _git(top, "rev-parse", "HEAD")
    res = project.run("apply", "--auto-approve", env={"GITHUB_SHA": "", "GITHUB_TOKEN": ""})
    assert res.returncode == 0, res.stdout + res.stderr

    r = Repo(top, project, "", "", "")
    merge = r.commit("Protect deployments.prod (#1)", {CONFIG: UPSTREAM + DEPLOYMENT})
    gh = FakeGitHub(repo=REPO).start()
    try:
        head = pull(gh, 1, merge, root)
        res = r.apply(gh, merge)
    finally:
        gh.stop()
    assert res.returncode == 0, res.stdout + res.stderr
    approval = project.locked()["deployments.prod"]["outputs"]["approval"]
    assert (approval["approver"], approval["pr_number"], approval["commit"]) == ("alice", 1, head)
    assert approval["applied_commit"] == merge
    r.promoted, r.lock = merge, project.read("llmops.lock")
    r.model_name = project.locked()["deployments.prod"]["outputs"]["model_name"]
    assert r.aliases() == {"production": "1"}
    return r


@pytest.fixture
def gh(repo: Repo):
    """A fresh fake GitHub, and the repository back at the first promotion."""
    _git(repo.top, "reset", "-q", "--hard", repo.promoted)
    (repo.project.root / "llmops.lock").write_text(repo.lock)
    fake = FakeGitHub(repo=REPO).start()
    yield fake
    fake.stop()


# -- the bypass attempts: each sets up commits and pull requests, and returns GITHUB_SHA ---------


def uncommitted_edits(r: Repo, gh: FakeGitHub) -> str:
    text = r.config()[CONFIG].replace("approval: required", "approval: required, approvers: [mallory]")
    (r.top / CONFIG).write_text(text)  # never committed: GITHUB_SHA is the approved commit
    return r.promoted


def self_named_approvers(r: Repo, gh: FakeGitHub) -> str:
    edits = {CONFIG: r.config()[CONFIG].replace("approval: required", "approval: required, approvers: [mallory]")}
    merge = r.commit("Ship it (#2)", edits)
    pull(gh, 2, merge, r.promoted, reviews=(("mallory", "APPROVED"),))
    return merge


def merged_into_another_branch(r: Repo, gh: FakeGitHub) -> str:
    merge = r.commit("Try staging (#3)", r.config())
    pull(gh, 3, merge, r.promoted, base_ref="experiment")
    return merge


def unreviewed_change_then_approved_unrelated(r: Repo, gh: FakeGitHub) -> str:
    change = r.commit("Move to staging (#4)", r.config())
    pull(gh, 4, change, r.promoted, reviews=())
    typo = r.commit("Fix a typo (#5)", {"README.md": "# Support\n"})
    pull(gh, 5, typo, change)
    return typo


def stale_approval(r: Repo, gh: FakeGitHub) -> str:
    merge = r.commit("Staging (#6)", r.config())
    pull(gh, 6, merge, r.promoted)
    gh.push(6, _fake_sha("pr-6-second-commit"))  # pushed after alice approved
    return merge


def changes_requested_after_approval(r: Repo, gh: FakeGitHub) -> str:
    merge = r.commit("Staging (#7)", r.config())
    pull(gh, 7, merge, r.promoted, reviews=(("alice", "APPROVED"), ("bob", "CHANGES_REQUESTED")))
    return merge


def self_approval(r: Repo, gh: FakeGitHub) -> str:
    merge = r.commit("Staging (#8)", r.config())
    pull(gh, 8, merge, r.promoted, author="alice")
    return merge


def approval_on_another_pull_request(r: Repo, gh: FakeGitHub) -> str:
    change = r.commit("Staging", r.config())  # pushed directly; GitHub links it to PR #9 anyway
    pull(gh, 9, _fake_sha("pr-9-merge"), r.promoted)  # approved and merged, but not this commit
    gh.associate(change, 9)
    return change


def approved_pull_request_not_merged(r: Repo, gh: FakeGitHub) -> str:
    change = r.commit("Staging", r.config())
    gh.add_pr(10, head_sha=change, merged=False, base_sha=r.promoted)
    gh.add_review(10, "alice", "APPROVED", commit_id=change)
    return change


def pushed_without_pull_request(r: Repo, gh: FakeGitHub) -> str:
    return r.commit("Staging, no review", r.config())


def protection_turned_off_unreviewed(r: Repo, gh: FakeGitHub) -> str:
    merge = r.commit("Unprotect (#11)", r.config("approval: required", "approval: none"))
    pull(gh, 11, merge, r.promoted, reviews=())
    return merge


def head_is_not_github_sha(r: Repo, gh: FakeGitHub) -> str:
    merge = r.commit("Staging (#12)", r.config())
    pull(gh, 12, merge, r.promoted)
    r.commit("Something else, on top", r.config("alias: staging", "alias: canary"))
    return merge  # the approved commit, while HEAD is one after it


Case = Callable[[Repo, FakeGitHub], str]
BYPASSES: list[tuple[Case, str]] = [
    (uncommitted_edits, "(rule: clean working tree): the working tree has changes that no pull request reviewed (M ml/llmops.yaml)"),
    (self_named_approvers, "(rule: allowed approver from the base): pull request #2 was approved by mallory, who may not approve"),
    (merged_into_another_branch, "(rule: merged into the default branch): commit {sha} came through pull request #3, which was merged into 'experiment', not the default branch 'main'"),
    (unreviewed_change_then_approved_unrelated, "(rule: allowed approver from the base): pull request #4 has no approving review; ask one of: @alice"),
    (stale_approval, "(rule: approved after the last commit): approval of pull request #6 by alice was for an older commit"),
    (changes_requested_after_approval, "(rule: no changes requested): pull request #7 has changes requested by bob"),
    (self_approval, "(rule: no self-approval): pull request #8 was approved only by its author alice"),
    (approval_on_another_pull_request, "(rule: merged pull request): commit {sha} changed the deployment but is not one that pull request #9 merged"),
    (approved_pull_request_not_merged, "(rule: merged pull request): commit {sha} changed the deployment and is associated only with pull request #10, which is not merged"),
    (pushed_without_pull_request, "(rule: merged pull request): commit {sha} changed the deployment without a pull request"),
    (protection_turned_off_unreviewed, "(rule: allowed approver from the base): pull request #11 has no approving review"),
    (head_is_not_github_sha, "(rule: HEAD is GITHUB_SHA): HEAD is {head} but GITHUB_SHA is {sha}"),
]


@pytest.mark.parametrize(("attempt", "says"), BYPASSES, ids=[c.__name__ for c, _ in BYPASSES])
def test_bypass_promotes_nothing(repo: Repo, gh: FakeGitHub, attempt: Case, says: str):
    sha = attempt(repo, gh)
    res = repo.apply(gh, sha)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    head = _git(repo.top, "rev-parse", "HEAD")
    assert "promotion not approved " + says.format(sha=sha[:12], head=head[:12]) in out
    assert "nothing was promoted" in out
    assert repo.project.read("llmops.lock") == repo.lock
    assert repo.aliases() == {"production": "1"}


def test_reviewed_change_is_promoted_and_the_lock_names_the_approval(repo: Repo, gh: FakeGitHub):
    typo = repo.commit("Fix a typo, unreviewed (#20)", {"README.md": "# Support\n"})  # not an input
    pull(gh, 20, typo, repo.promoted, reviews=())
    merge = repo.commit("Staging (#21)", repo.config())
    head = pull(gh, 21, merge, typo, reviews=(("carol", "COMMENTED"), ("alice", "APPROVED")))
    res = repo.apply(gh, merge)
    assert res.returncode == 0, res.stdout + res.stderr
    approval = repo.project.locked()["deployments.prod"]["outputs"]["approval"]
    assert approval["approved"] is True and approval["source"] == "github"
    assert (approval["approver"], approval["pr_number"], approval["commit"]) == ("alice", 21, head)
    assert approval["applied_commit"] == merge and approval["pull_requests"] == [21]
    assert repo.aliases() == {"staging": "1"}  # renamed: production is gone, staging promoted
    assert TOKEN not in repo.project.read("llmops.lock")
    assert [r.path for r in gh.requests if r.path.endswith(f"/commits/{typo}/pulls")] == []  # never asked

    # The alias deleted by hand is drift; putting it back changes nothing the deployment depends
    # on since the approved commit, so no pull request is looked up and the approval is kept.
    repo.registry().delete_registered_model_alias(repo.model_name, "staging")
    gh.requests.clear()
    res = repo.apply(gh, merge)
    assert res.returncode == 0, res.stdout + res.stderr
    assert repo.aliases() == {"staging": "1"}
    again = repo.project.locked()["deployments.prod"]["outputs"]["approval"]
    assert (again["approver"], again["pr_number"], again["applied_commit"]) == ("alice", 21, merge)
    assert not [r for r in gh.requests if "/pulls" in r.path]


# -- outside GitHub -------------------------------------------------------------------------------


def test_outside_github_only_an_allowed_local_approval_of_a_clean_tree_promotes(repo: Repo, gh: FakeGitHub):
    local = {"GITHUB_SHA": "", "GITHUB_TOKEN": ""}
    repo.commit("Staging", repo.config())
    res = repo.project.run("apply", "--auto-approve", env=local)
    assert res.returncode == 1
    assert "promotion needs approval" in res.stdout and "nothing was promoted" in res.stdout
    res = repo.project.run("apply", "--auto-approve", "--approved-by", "alice", env=local)
    assert res.returncode == 1 and "settings.allow_local_approvals" in res.stdout

    allow = repo.config("project: bypass\n", "project: bypass\nsettings: {allow_local_approvals: true}\n")
    head = repo.commit("Allow local approvals", allow)
    # mallory is not an owner of ml/llmops.yaml in the repository's .github/CODEOWNERS
    res = repo.project.run("apply", "--auto-approve", "--approved-by", "mallory", env=local)
    assert res.returncode == 1 and "mallory may not approve this promotion; allowed: @alice" in res.stdout
    (repo.top / "README.md").write_text("uncommitted\n")
    res = repo.project.run("apply", "--auto-approve", "--approved-by", "alice", env=local)
    assert res.returncode == 1 and "(rule: clean working tree)" in res.stdout and "M README.md" in res.stdout
    assert repo.project.read("llmops.lock") == repo.lock

    _git(repo.top, "checkout", "--", "README.md")
    res = repo.project.run("apply", "--auto-approve", "--approved-by", "alice", env=local)
    assert res.returncode == 0, res.stdout + res.stderr
    approval = repo.project.locked()["deployments.prod"]["outputs"]["approval"]
    assert (approval["source"], approval["approver"], approval["applied_commit"]) == ("local", "alice", head)
    assert repo.aliases() == {"staging": "1"}


# -- monitors drive no server ---------------------------------------------------------------------


def test_what_a_protected_server_logs_changes_only_with_an_approval(repo: Repo, gh: FakeGitHub):
    """A monitor's request-log change restarts the server through the deployment's own apply
    (refresh drift `request-log`), so on a protected deployment it needs the approval: logging
    the users' prompt texts, pushed without review, is refused and the server keeps running
    as it was."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served = (UPSTREAM + DEPLOYMENT.replace("approval: required}", f"approval: required, serve: {{port: {port}}}}}")
              + "monitors:\n  prod: {log_text: false}\n")
    merge = repo.commit("Serve prod, with a monitor (#30)", {CONFIG: served})
    pull(gh, 30, merge, repo.promoted)
    state_file = repo.project.path(".llmops/serve/prod.json")
    try:
        res = repo.apply(gh, merge, subprocess=True)
        assert res.returncode == 0, res.stdout + res.stderr
        before = json.loads(state_file.read_text())
        assert before["monitor"]["log_text"] is False

        pushed = repo.commit("Log prompt texts", {CONFIG: served.replace("log_text: false", "log_text: true")})
        plan = json.loads(repo.project.run("plan", "--json").stdout)
        changes = {c["address"]: c for c in plan["resource_changes"]}
        assert (changes["deployments.prod"]["action"], changes["deployments.prod"]["codes"]) == (
            "update", ["drift:request-log"])
        assert "sqlite:///.llmops/monitor/prod.db (without texts)" in changes["deployments.prod"]["reasons"][0]
        assert (changes["monitors.prod"]["action"], changes["monitors.prod"]["codes"]) == ("update", ["field:log_text"])
        res = repo.apply(gh, pushed, subprocess=True)
        assert res.returncode == 1 and "promotion not approved" in res.stdout, res.stdout + res.stderr
        still = json.loads(state_file.read_text())
        assert still["pid"] == before["pid"] and still["monitor"]["log_text"] is False

        pull(gh, 31, pushed, merge)  # the same change, reviewed by alice and merged
        res = repo.apply(gh, pushed, subprocess=True)
        assert res.returncode == 0, res.stdout + res.stderr
        after = json.loads(state_file.read_text())
        assert after["pid"] != before["pid"] and after["monitor"]["log_text"] is True
        assert repo.project.locked()["monitors.prod"]["outputs"]["log_text"] is True

        # the monitor's other settings change no server: pushed unreviewed, they just apply
        tuned = repo.commit("Tighten drift", {CONFIG: served.replace("log_text: false", "log_text: true, window: 50")})
        res = repo.apply(gh, tuned)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "deployments.prod" not in res.stdout and "monitors.prod: update complete" in res.stdout
        assert json.loads(state_file.read_text())["pid"] == after["pid"]
    finally:
        repo.project.run("down", "prod")
