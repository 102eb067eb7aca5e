"""Prompts through the real CLI: content versions in MLflow's prompt registry, alias drift."""

from __future__ import annotations

CONFIG = """\
version: 1
project: p
prompts:
  support:
    template: prompts/support.j2
    variables: [question]
    examples:
      - inputs: {question: "Where is my order?"}
        expect: {contains: "Where is my order?"}
  chatty:
    chat: {system: "You are terse.", user: "{{ question }}"}
    variables: [question]
"""


def _client(project):
    from llmops.integrations.mlflow import client

    return client(project.root, {})


def test_prompt_versions_follow_content_and_alias_drift_is_seen(project):
    project.write({"llmops.yaml": CONFIG, "prompts/support.j2": "Q: {{ question }}\nA:"})
    res = project.run("apply", "--auto-approve")
    assert res.returncode == 0, res.stdout + res.stderr
    c = _client(project)
    assert c.get_prompt_version_by_alias("support", "default").version in (1, "1")
    assert c.get_prompt_version("support", 1).template == "Q: {{ question }}\nA:"
    assert "No changes." in project.run("plan").stdout

    project.write({"prompts/support.j2": "Question: {{ question }}\nAnswer:"})
    res = project.run("plan")
    assert "prompts.support  replace" in res.stdout and "source content changed (prompts/support.j2)" in res.stdout
    assert project.run("apply", "--auto-approve").returncode == 0
    assert int(c.get_prompt_version_by_alias("support", "default").version) == 2

    # Someone moves the alias by hand: plan shows drift and apply puts it back.
    c.set_prompt_alias("support", "default", 1)
    res = project.run("plan")
    assert "prompts.support  update" in res.stdout
    assert "drift: prompt alias default -> v1, lock says v2" in res.stdout
    assert project.run("apply", "--auto-approve").returncode == 0
    assert int(c.get_prompt_version_by_alias("support", "default").version) == 2
    assert "No changes." in project.run("plan").stdout


def test_broken_example_fails_validation_before_any_work(project):
    project.write({"llmops.yaml": CONFIG.replace('contains: "Where is my order?"', 'contains: "Answer:"'),
                   "prompts/support.j2": "Q: {{ question }}\nA:"})
    res = project.run("validate")
    assert res.returncode == 1
    assert "prompts.support" in res.stderr and "Answer:" in res.stderr
    res = project.run("apply", "--auto-approve")
    assert res.returncode == 1 and not project.path("llmops.lock").exists()


def test_a_pull_requests_job_moves_only_its_own_prompt_alias(project):
    """The PR's CI job applies with LLMOPS_PROMPT_ALIAS=pr-N: the new version is registered,
    the alias applications read (`default`) stays; main's apply then finds that version."""
    project.write({"llmops.yaml": CONFIG, "prompts/support.j2": "Q: {{ question }}\nA:"})
    assert project.run("apply", "--auto-approve").returncode == 0
    project.write({"prompts/support.j2": "Question: {{ question }}\nAnswer:"})
    res = project.run("apply", "--auto-approve", env={"LLMOPS_PROMPT_ALIAS": "pr-7"})
    assert res.returncode == 0, res.stdout + res.stderr
    c = _client(project)
    assert int(c.get_prompt_version_by_alias("support", "pr-7").version) == 2
    assert int(c.get_prompt_version_by_alias("support", "default").version) == 1
    bad = project.run("apply", "--auto-approve", env={"LLMOPS_PROMPT_ALIAS": "PR 7; rm"})
    assert bad.returncode == 1 and "LLMOPS_PROMPT_ALIAS" in bad.stdout + bad.stderr
