"""The wheel as a user gets it: built from the source tree, installed into a fresh venv, and
`llmops init`, `validate` and `plan` run from there in a folder outside the checkout; `init` in
an existing repository on `master`, whose workflows then pass actionlint with shellcheck.

Offline: pip builds without build isolation (setuptools comes from .venv) and installs the
wheel alone with --no-index. The fresh venv reaches the dependencies already in .venv through
a .pth line naming .venv's site-packages; `.pth` files inside that folder are not processed
from there, so .venv's editable llmops (an import hook installed by its .pth) never loads and
the llmops that runs is the wheel's, which the test checks.
"""

from __future__ import annotations

import email
import os
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

import llmops

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "llmops"


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources, so that a build/ folder (stale files, or a
    concurrent build in the checkout) cannot leak into it."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(PACKAGE, src / "llmops", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
          "-q", "-w", str(dist)], cwd=src)
    (built,) = dist.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed and .venv's packages reachable for its dependencies."""
    root = tmp_path_factory.mktemp("venv") / "v"
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root.parent)
    python = root / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=root).stdout
    (Path(purelib.strip()) / "dependencies-from-dot-venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], cwd=root)
    return root


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", "VIRTUAL_ENV": str(venv)}


def test_wheel_is_the_renamed_distribution_with_schema_and_templates(wheel: Path):
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert config["project"]["name"] == llmops.DISTRIBUTION == "llmops-gitops"  # `llmops` on PyPI is not ours
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_string(archive.read(metadata_name).decode())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    assert metadata["Name"] == "llmops-gitops" and metadata["Version"] == llmops.__version__
    assert "llmops = llmops.cli.main:main" in scripts
    data = [
        p.relative_to(REPO).as_posix()
        for folder in ("schemas", "templates", "evals/probes")
        for p in (PACKAGE / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    assert "llmops/schemas/llmops.schema.json" in data and "llmops/templates/project/gitignore" in data
    assert {"llmops/templates/project/data/tickets.jsonl", "llmops/templates/project/prompts/support.j2"} <= set(data)
    assert sorted(set(data) - names) == []  # every schema, template and probe file ships


def test_installed_wheel_inits_validates_and_plans(venv: Path, tmp_path: Path):
    env = _env(venv)
    where = _run([str(venv / "bin" / "python"), "-c",
                  "import llmops, llmops.operations.scaffold as s, importlib.metadata as m;"
                  "print(llmops.__file__); print(s.templates_dir()); print(m.version('llmops-gitops'))"],
                 cwd=tmp_path, env=env).stdout.splitlines()
    for path in where[:2]:
        assert Path(path).is_relative_to(venv), where  # the wheel's llmops, not the source tree
    assert where[2] == llmops.__version__

    project = tmp_path / "support-bot"
    project.mkdir()
    cli = str(venv / "bin" / "llmops")
    init = _run([cli, "init"], cwd=project, env=env)
    assert "created   requirements.txt" in init.stdout
    assert f"llmops-gitops=={llmops.__version__}" in (project / "requirements.txt").read_text().splitlines()
    assert (project / ".github/workflows/llmops-apply.yml").is_file() and (project / ".dvc").is_dir()
    _run([cli, "validate"], cwd=project, env=env)
    plan = _run([cli, "plan", "--refresh=false"], cwd=project, env=env)
    assert "datasets.tickets" in plan.stdout


def test_installed_wheel_inits_a_repository_whose_workflows_pass_actionlint(venv: Path, tmp_path: Path):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed: actionlint would skip the run: steps (apt-get install shellcheck)")
    repo = tmp_path / "repo"
    repo.mkdir()
    for args in (["init", "-q", "-b", "master"], ["commit", "-q", "--allow-empty", "-m", "first"]):
        _run(["git", *args], cwd=repo)
    env = _env(venv)
    _run([str(venv / "bin" / "llmops"), "init"], cwd=repo, env=env)
    apply_workflow = yaml.safe_load((repo / ".github/workflows/llmops-apply.yml").read_text())
    # the repository's branch, not main (PyYAML reads the key `on` as True)
    assert apply_workflow[True]["push"]["branches"] == ["master"]
    workflows = sorted(str(p) for p in (repo / ".github/workflows").glob("*.yml"))
    assert len(workflows) == 2
    actionlint = Path(sys.executable).parent / "actionlint"
    lint = subprocess.run([str(actionlint), "-no-color", f"-shellcheck={shellcheck}", *workflows],
                          cwd=repo, capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr
