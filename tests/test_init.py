"""`llmops init`: the scaffold, its refusal to overwrite, .gitignore merging, real git + DVC,
the requirement that installs llmops in CI and the branch the workflows deploy from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from llmops.engine.addrs import KINDS
from llmops.cli.gitops import init_command
import llmops
from llmops.operations.scaffold import ScaffoldError, detect_default_branch, init_project

SCAFFOLD = [
    ".github/workflows/llmops-apply.yml",
    ".github/workflows/llmops-plan.yml",
    "data/tickets.jsonl",
    "llmops.yaml",
    "prompts/support.j2",
    "requirements.txt",
]


@pytest.fixture(autouse=True)
def git_config(tmp_path_factory, monkeypatch):
    """This machine's git settings stay out (init.defaultBranch picks the branch); returns a
    function that sets a user-wide one. Commit identities come from conftest's GIT_* env."""
    path = tmp_path_factory.mktemp("gitconfig") / "config"
    path.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(path))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    return lambda key, value: subprocess.run(["git", "config", "--file", str(path), key, value], check=True)


def _init(root: Path, monkeypatch, *args: str):
    monkeypatch.chdir(root)
    return CliRunner().invoke(init_command, list(args))


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def test_init_scaffolds_a_project(tmp_path: Path, monkeypatch):
    root = tmp_path / "Support Bot"
    root.mkdir()
    result = _init(root, monkeypatch)
    assert result.exit_code == 0, result.output
    for rel in SCAFFOLD:
        assert (root / rel).is_file(), rel
        assert f"created   {rel}" in result.output
    config = yaml.safe_load((root / "llmops.yaml").read_text())
    assert config["project"] == "support-bot"  # from the folder name, made valid
    rows = [json.loads(line) for line in (root / "data/tickets.jsonl").read_text().splitlines()]
    assert len(rows) >= 20 and all(set(r) == {"question", "answer"} for r in rows)
    assert "{{ question }}" in (root / "prompts/support.j2").read_text()  # copied, not rendered

    assert (root / ".git").is_dir() and (root / ".dvc" / "config").is_file()
    assert _git(root, "symbolic-ref", "--short", "HEAD").stdout.strip() == "main"
    # real git agrees that llmops' state and the DVC cache are ignored, the config is not
    for ignored in (".llmops/mlflow.db", ".dvc/cache/files/md5/ab/cd"):
        assert _git(root, "check-ignore", "-q", ignored).returncode == 0, ignored
    assert _git(root, "check-ignore", "-q", "llmops.yaml").returncode == 1
    assert _requirements(root) == [f"llmops-gitops=={llmops.__version__}"]
    assert _deploy_branches(root) == ["main"]


def test_scaffold_config_is_small_and_shows_every_kind(tmp_path: Path, monkeypatch):
    result = init_project(tmp_path, name="demo")
    assert result.project == "demo" and result.git_initialised and result.dvc_initialised
    text = (tmp_path / "llmops.yaml").read_text()
    config = yaml.safe_load(text)
    active = [k for k in KINDS if k in config]
    assert active == ["datasets", "prompts", "base_models", "finetunes", "evals", "deployments"]
    for kind in KINDS + ("settings", "targets"):
        assert f"{kind}:" in text  # active or shown as a comment
    assert "monitors" not in config and "# monitors:" in text
    tune = config["finetunes"]["support-lora"]
    assert tune["training"]["epochs"] == 1
    assert "build" in config["base_models"][tune["base_model"]]
    assert any("split" in step for step in config["datasets"]["tickets"]["prepare"])
    assert config["deployments"]["support-prod"]["gates"] == ["support-quality"]


def test_scaffold_passes_llmops_validation(tmp_path: Path):
    from llmops.config.validate import load_config

    init_project(tmp_path, name="demo")
    config = load_config(tmp_path)
    assert sorted(config.resources) == sorted(
        [
            "datasets.tickets",
            "prompts.support",
            "base_models.tiny",
            "finetunes.support-lora",
            "evals.support-quality",
            "deployments.support-prod",
        ]
    )


def test_refuses_to_overwrite_and_writes_nothing(tmp_path: Path, monkeypatch):
    (tmp_path / "llmops.yaml").write_text("mine: true\n")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts/support.j2").write_text("my prompt\n")
    result = _init(tmp_path, monkeypatch)
    assert isinstance(result.exception, ScaffoldError)
    message = str(result.exception)
    assert "llmops.yaml" in message and "prompts/support.j2" in message and "--force" in message
    assert (tmp_path / "llmops.yaml").read_text() == "mine: true\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llmops.yaml", "prompts"]  # no .git, no data/

    forced = _init(tmp_path, monkeypatch, "--force", "--name", "forced")
    assert forced.exit_code == 0, forced.output
    assert "overwrote llmops.yaml" in forced.output and "created   data/tickets.jsonl" in forced.output
    assert yaml.safe_load((tmp_path / "llmops.yaml").read_text())["project"] == "forced"


def test_gitignore_is_merged_not_overwritten(tmp_path: Path):
    (tmp_path / ".gitignore").write_text("node_modules/\n.llmops/")  # no trailing newline
    first = init_project(tmp_path, name="demo")
    text = (tmp_path / ".gitignore").read_text()
    assert text.startswith("node_modules/\n.llmops/\n")
    assert text.count(".llmops/") == 1 and "/.dvc/cache/" in text
    assert first.gitignore_added == ["/.dvc/cache/", "/.dvc/tmp/"]
    again = init_project(tmp_path, name="demo", force=True)  # re-run: git and DVC exist already
    assert again.gitignore_added == [] and (tmp_path / ".gitignore").read_text() == text
    assert not again.git_initialised and not again.dvc_initialised


def test_invalid_name_is_refused(tmp_path: Path, monkeypatch):
    result = _init(tmp_path, monkeypatch, "--name", "Bad Name!")
    assert isinstance(result.exception, ScaffoldError) and "--name" in str(result.exception)
    assert list(tmp_path.iterdir()) == []


def test_init_inside_an_existing_repository(tmp_path: Path):
    assert _git(tmp_path, "init", "-q").returncode == 0
    sub = tmp_path / "ml"
    sub.mkdir()
    result = init_project(sub, name="ml")
    assert not result.git_initialised and not (sub / ".git").exists()
    assert result.dvc_initialised and (sub / ".dvc").is_dir()  # `dvc init --subdir`
    assert any("working-directory" in w for w in result.warnings)


def test_cli_module_imports_nothing_heavy():
    code = (
        "import sys, llmops.cli.gitops, llmops.gitops;"
        "print([m for m in ('torch', 'transformers', 'mlflow', 'dvc', 'peft', 'jinja2') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("rel", SCAFFOLD[:2])
def test_scaffolded_workflows_are_the_rendered_templates(tmp_path: Path, rel: str):
    from llmops.operations.scaffold import render_workflows

    init_project(tmp_path, name="demo")
    assert (tmp_path / rel).read_text() == render_workflows()[rel]


def _requirements(root: Path) -> list[str]:
    lines = (root / "requirements.txt").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def _deploy_branches(root: Path) -> list[str]:
    doc = yaml.safe_load((root / ".github/workflows/llmops-apply.yml").read_text())
    return doc[True]["push"]["branches"]  # PyYAML reads the key `on` as True


def _repo(path: Path, branch: str, commit: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    assert _git(path, "init", "-q", "-b", branch).returncode == 0
    if commit:
        assert _git(path, "commit", "-q", "--allow-empty", "-m", "first").returncode == 0
    return path


@pytest.mark.parametrize(
    "requirement",
    ["git+https://github.com/acme/llmops@v0.1.0", "llmops-gitops @ git+https://github.com/acme/llmops@v1",
     "llmops_gitops>=0.1", "  llmops-gitops==0.1.0  "],
)
def test_requirement_given_is_written(tmp_path: Path, monkeypatch, requirement: str):
    result = _init(tmp_path, monkeypatch, "--requirement", requirement)
    assert result.exit_code == 0, result.output
    assert _requirements(tmp_path) == [requirement.strip()]


@pytest.mark.parametrize(
    "requirement",
    ["llmops", "llmops==0.1.0", "LLMOps>=0.1", "llmops[s3]", "llmops @ git+https://github.com/x/y",
     "LLMOPS ; python_version >= '3.11'", "a\nllmops", "", "   "],
)
def test_squatted_name_and_bad_requirements_are_refused(tmp_path: Path, monkeypatch, requirement: str):
    # `llmops` on PyPI is an unrelated package: CI would run it with the job's tokens
    result = _init(tmp_path, monkeypatch, "--requirement", requirement)
    assert isinstance(result.exception, ScaffoldError), result.output
    assert "git+https://github.com/ORG/REPO@TAG" in str(result.exception)
    assert list(tmp_path.iterdir()) == []


def test_workflows_deploy_from_the_repository_branch(tmp_path: Path, monkeypatch, git_config):
    git_config("init.defaultBranch", "main")  # a repository on master wins over the user-wide default
    root = _repo(tmp_path / "repo", "master")
    result = _init(root, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "workflows deploy from master" in result.output
    assert _deploy_branches(root) == ["master"]
    assert _git(root, "symbolic-ref", "--short", "HEAD").stdout.strip() == "master"


def test_branch_option_overrides_detection(tmp_path: Path, monkeypatch):
    root = _repo(tmp_path / "repo", "master")
    result = _init(root, monkeypatch, "--branch", "release/v1")
    assert result.exit_code == 0, result.output
    assert _deploy_branches(root) == ["release/v1"]
    assert _git(root, "symbolic-ref", "--short", "HEAD").stdout.strip() == "master"  # the repository is left as it is


def test_new_repository_starts_on_the_given_branch(tmp_path: Path, monkeypatch):
    result = _init(tmp_path, monkeypatch, "--branch", "trunk")
    assert result.exit_code == 0, result.output
    assert _deploy_branches(tmp_path) == ["trunk"]
    assert _git(tmp_path, "symbolic-ref", "--short", "HEAD").stdout.strip() == "trunk"


@pytest.mark.parametrize("branch", ['a"b', "x y", "-main", "a..b", "feat/", "${{ github.ref }}", "a\nb"])
def test_branch_that_workflows_cannot_name_is_refused(tmp_path: Path, monkeypatch, branch: str):
    result = _init(tmp_path, monkeypatch, "--branch", branch)
    assert isinstance(result.exception, ScaffoldError) and "--branch" in str(result.exception)
    assert list(tmp_path.iterdir()) == []


def _clone_of(tmp_path: Path, remote_branch: str, local_branch: str) -> Path:
    upstream = _repo(tmp_path / "upstream", remote_branch)
    clone = tmp_path / "clone"
    assert _git(tmp_path, "clone", "-q", str(upstream), str(clone)).returncode == 0
    assert _git(clone, "checkout", "-q", "-b", local_branch).returncode == 0
    return clone


@pytest.mark.parametrize(
    "setup, default_branch, expected",
    [
        # the remote's default beats the branch checked out and the user-wide setting
        (lambda tmp: _clone_of(tmp, "trunk", "feature/x"), "develop", "trunk"),
        # a repository's current branch (with commits, or still unborn) beats the user-wide setting
        (lambda tmp: _repo(tmp / "r", "master"), "develop", "master"),
        (lambda tmp: _repo(tmp / "r", "stable", commit=False), "develop", "stable"),
        # no repository: the branch `git init` will create, else main
        (lambda tmp: tmp, "develop", "develop"),
        (lambda tmp: tmp, None, "main"),
    ],
    ids=["origin-head", "current-branch", "unborn-branch", "init-defaultBranch", "fallback-main"],
)
def test_detect_default_branch(tmp_path: Path, git_config, setup, default_branch, expected):
    if default_branch:
        git_config("init.defaultBranch", default_branch)
    root = setup(tmp_path)
    assert detect_default_branch(root) == expected
