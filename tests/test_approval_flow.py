"""Promotions that need a reviewed pull request, through the real `llmops apply`.

GitHub is the one fake (tests/fake_github.py, documented REST shapes on 127.0.0.1); MLflow,
DVC and training are real.
"""

from __future__ import annotations


import pytest

from fake_github import TOKEN, FakeGitHub

HEAD, MERGE, REPO = "a" * 40, "b" * 40, "acme/support"

CONFIG = """\
version: 1
project: approvals
settings: {allow_local_approvals: LOCAL}
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
deployments:
  prod: {model: lora, alias: production, gates: [quality], approval: required, approvers: [alice]}
"""


@pytest.mark.slow
def test_promotion_waits_for_an_approved_pull_request(project, tmp_path):
    project.copy_example()
    project.write({"llmops.yaml": CONFIG.replace("LOCAL", "false")})

    # No GitHub context and no approval: everything else applies, the promotion does not.
    res = project.run("apply", "--auto-approve", env={"GITHUB_SHA": "", "GITHUB_TOKEN": ""})
    assert res.returncode == 1
    assert "promotion needs approval" in res.stdout and "nothing was promoted" in res.stdout
    lock = project.locked()
    assert "finetunes.lora" in lock and "evals.quality" in lock and "deployments.prod" not in lock

    # --approved-by is refused unless the config allows local approvals.
    res = project.run("apply", "--auto-approve", "--approved-by", "alice")
    assert res.returncode == 1 and "settings.allow_local_approvals" in res.stdout

    gh = FakeGitHub(repo=REPO).start()
    try:
        gh.add_pr(7, head_sha=HEAD, merge_sha=MERGE)
        env = {"GITHUB_TOKEN": TOKEN, "GITHUB_REPOSITORY": REPO, "GITHUB_API_URL": gh.url, "GITHUB_SHA": MERGE}
        # Approved by someone who may not approve: refused.
        gh.add_review(7, "mallory", "APPROVED", commit_id=HEAD)
        res = project.run("apply", "--auto-approve", env=env)
        assert res.returncode == 1 and "not approved" in res.stdout
        assert "deployments.prod" not in project.locked()
        # Approved by an allowed reviewer on the last commit: promoted, and the lock says by whom.
        gh.add_review(7, "alice", "APPROVED", commit_id=HEAD)
        res = project.run("apply", "--auto-approve", env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        approval = project.locked()["deployments.prod"]["outputs"]["approval"]
        assert approval["approved"] is True and approval["approver"] == "alice"
        assert approval["pr_number"] == 7 and approval["commit"] == HEAD
        assert TOKEN not in project.read("llmops.lock")  # secrets never reach the lock
    finally:
        gh.stop()

    # Locally approved where the config allows it.
    project.write({"llmops.yaml": CONFIG.replace("LOCAL", "true").replace("alias: production", "alias: staging")})
    res = project.run("apply", "--auto-approve", "--approved-by", "alice", env={"GITHUB_SHA": ""})
    assert res.returncode == 0, res.stdout + res.stderr
    assert project.locked()["deployments.prod"]["outputs"]["approval"]["source"] == "local"
