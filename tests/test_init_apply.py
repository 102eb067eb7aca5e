"""`llmops init` in an empty folder gives a project whose plan/apply run offline right away."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_init_then_plan_apply_offline(project):
    res = project.run("init", "--name", "fresh")
    assert res.returncode == 0, res.stderr
    assert project.path(".github/workflows/llmops-plan.yml").exists()
    assert project.path(".git").is_dir() and project.path(".dvc").is_dir()
    res = project.run("plan", "--detailed-exitcode")
    assert res.returncode == 2, res.stdout + res.stderr
    res = project.run("apply", "--auto-approve")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Apply complete" in res.stdout
    res = project.run("plan", "--detailed-exitcode")
    assert res.returncode == 0 and "No changes." in res.stdout
    res = project.run("init")
    assert res.returncode == 1 and "--force" in (res.stdout + res.stderr)
