"""`llmops init`: scaffold a project folder from the package's `llmops/templates/`.

`templates/project/` holds the project files (`*.tmpl` are rendered, the rest copied;
`gitignore` is merged into `.gitignore`), `templates/workflows/` the GitHub Actions
workflows, written to `.github/workflows/`. Templates use `[[ var ]]` / `[% ... %]` so
that GitHub's `${{ ... }}` passes through untouched. Existing files are never overwritten
without `force`, and nothing is written when one would be. Git and DVC are initialised with
subprocesses (`git init`; `python -m dvc init` through `llmops.integrations.dvcrun`, as every DVC
command llmops runs): nothing heavy is imported here.

The generated `requirements.txt` installs this llmops (`llmops-gitops==VERSION`, or the
requirement the user gives); the workflows trigger on the repository's default branch, found
by `detect_default_branch` unless given.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import llmops
from llmops.errors import LlmopsError
from llmops.fsutil import atomic_write_text

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
# Branch names the workflows can quote in YAML and GitHub expressions as they are; git allows
# more (quotes, `$`, braces), which would need escaping in every template that names the branch.
BRANCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
# The PyPI name `llmops` is an unrelated package: a requirement for it runs a stranger's code in CI.
SQUATTED_NAME = "llmops"
_REQUIREMENT_NAME_RE = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(?=$|[\[<>=!~;@(\s])")
WORKFLOW_DIR = ".github/workflows"
GITIGNORE_TEMPLATE = "gitignore"


class ScaffoldError(LlmopsError):
    """`llmops init` cannot scaffold here (existing files, bad name, git/dvc failure)."""


@dataclass
class ScaffoldResult:
    """What `init_project` did. Paths are project-relative, sorted."""

    root: Path
    project: str
    branch: str = "main"
    written: list[str] = field(default_factory=list)
    overwritten: list[str] = field(default_factory=list)
    gitignore_added: list[str] = field(default_factory=list)
    git_initialised: bool = False
    dvc_initialised: bool = False
    warnings: list[str] = field(default_factory=list)


def templates_dir() -> Path:
    """The package's `templates/` folder (shipped in the wheel as package data)."""
    path = Path(llmops.__file__).resolve().parent / "templates"
    if not (path / "project").is_dir() or not (path / "workflows").is_dir():
        raise ScaffoldError(
            f"llmops templates not found at {path}; this installation of llmops is incomplete: reinstall it."
        )
    return path


def _render(text: str, context: dict[str, str], name: str) -> str:
    import jinja2  # small, but only `init` needs it

    env = jinja2.Environment(
        variable_start_string="[[",
        variable_end_string="]]",
        block_start_string="[%",
        block_end_string="%]",
        comment_start_string="[#",
        comment_end_string="#]",
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    try:
        return env.from_string(text).render(**context)
    except jinja2.TemplateError as err:
        raise ScaffoldError(f"template {name} cannot be rendered: {err}; this is a bug in llmops' templates.") from None


def workflow_context(python_version: str = "3.11", install: str = "pip install -r requirements.txt", branch: str = "main") -> dict[str, str]:
    """Variables the workflow templates use."""
    return {"python_version": python_version, "install": install, "branch": branch}


def render_workflows(context: dict[str, str] | None = None) -> dict[str, str]:
    """`.github/workflows/NAME.yml` -> rendered text, for every workflow template."""
    ctx = context or workflow_context()
    folder = templates_dir() / "workflows"
    return {
        f"{WORKFLOW_DIR}/{path.name}": _render(path.read_text(), ctx, f"workflows/{path.name}")
        for path in sorted(folder.glob("*.yml"))
    }


def default_requirement() -> str:
    """The requirement that installs this very llmops from PyPI: `llmops-gitops==VERSION`."""
    return f"{llmops.DISTRIBUTION}=={llmops.__version__}"


def check_requirement(requirement: str) -> str:
    """`requirement` as one requirements.txt line, or ScaffoldError when it is empty, spans lines
    or names the squatted distribution `llmops`."""
    line = requirement.strip()
    if not line or "\n" in line or "\r" in line:
        raise ScaffoldError(
            "--requirement must be one requirements.txt line, e.g. "
            f"'{default_requirement()}' or 'git+https://github.com/ORG/REPO@TAG'."
        )
    match = _REQUIREMENT_NAME_RE.match(line)
    if match and re.sub(r"[-_.]+", "-", match.group(1)).lower() == SQUATTED_NAME:
        raise ScaffoldError(
            f"--requirement '{line}' names the PyPI package `{SQUATTED_NAME}`, which is not this project; "
            f"use '{default_requirement()}' or a git URL of llmops (git+https://github.com/ORG/REPO@TAG)."
        )
    return line


def check_branch(branch: str) -> str:
    """`branch` if the workflows can name it as it is, else ScaffoldError."""
    if not BRANCH_RE.match(branch) or ".." in branch or branch.endswith((".lock", "/", ".")) or "//" in branch:
        raise ScaffoldError(
            f"'{branch}' cannot be used as the workflows' branch: use letters, digits, '.', '_', '-' and '/' "
            "(e.g. --branch main)."
        )
    return branch


def detect_default_branch(root: Path) -> str:
    """The branch the apply workflow should deploy from.

    In order: the remote's default (`origin/HEAD`), the current branch of the repository `root`
    is in, git's `init.defaultBranch` (the branch `git init` will create), `main`. The current
    branch comes before `init.defaultBranch` because a repository already on `master` deploys
    from `master` whatever a user-wide setting says for new repositories.
    """
    remote = _git_output(["symbolic-ref", "--quiet", "--short", "refs/remotes/origin/HEAD"], root)
    if remote and remote.startswith("origin/"):
        return check_branch(remote.removeprefix("origin/"))
    for found in (
        _git_output(["symbolic-ref", "--quiet", "--short", "HEAD"], root),
        _git_output(["config", "init.defaultBranch"], root),
    ):
        if found:
            return check_branch(found)
    return "main"


def render_project(
    project: str, context: dict[str, str] | None = None, requirement: str | None = None
) -> dict[str, str]:
    """Every file `llmops init` writes (except .gitignore, which is merged): path -> text.

    `requirement` is the requirements.txt line that installs llmops (default: `default_requirement()`).
    """
    ctx = {
        **(context or workflow_context()),
        "project": project,
        "llmops_version": llmops.__version__,
        "requirement": check_requirement(requirement) if requirement is not None else default_requirement(),
    }
    folder = templates_dir() / "project"
    files: dict[str, str] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == GITIGNORE_TEMPLATE:
            continue
        if rel.endswith(".tmpl"):
            files[rel.removesuffix(".tmpl")] = _render(path.read_text(), ctx, f"project/{rel}")
        else:
            files[rel] = path.read_text()
    files.update(render_workflows(ctx))
    return files


def project_name(root: Path, name: str | None) -> str:
    """`name`, or the folder's name made into a valid resource name."""
    if name is None:
        name = re.sub(r"[^a-z0-9_-]+", "-", root.resolve().name.lower()).strip("-_") or "llmops-project"
    if not NAME_RE.match(name):
        raise ScaffoldError(
            f"'{name}' is not a valid project name: use lower-case letters, digits, '-' and '_', "
            "starting with a letter or digit (e.g. --name support-assistant)."
        )
    return name


def init_project(
    root: Path,
    *,
    name: str | None = None,
    force: bool = False,
    branch: str | None = None,
    requirement: str | None = None,
    context: dict[str, str] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> ScaffoldResult:
    """Scaffold a project in `root`: files, .gitignore entries, git and DVC.

    `branch` is the branch the workflows deploy from (default: `detect_default_branch`), also the
    one a new repository starts on; `requirement` the requirements.txt line that installs llmops;
    `context` the other workflow variables (`workflow_context`).
    Refuses (ScaffoldError, nothing written) when a file it would write exists, unless `force`.
    """
    root = root.resolve()
    project = project_name(root, name)
    ctx = dict(context or workflow_context())
    ctx["branch"] = check_branch(branch) if branch is not None else detect_default_branch(root)
    files = render_project(project, ctx, requirement)
    existing = sorted(rel for rel in files if (root / rel).exists())
    if existing and not force:
        raise ScaffoldError(
            f"llmops init would overwrite {len(existing)} existing file(s) in {root}: {', '.join(existing)}; "
            "move them away or run `llmops init --force` to overwrite them."
        )
    if shutil.which("git") is None:
        raise ScaffoldError("git is not installed or not on PATH; install git, then run `llmops init` again.")

    result = ScaffoldResult(root=root, project=project, overwritten=existing)
    for rel, text in files.items():
        atomic_write_text(root / rel, text)
        log(f"wrote {rel}")
    result.written = sorted(files)
    result.gitignore_added = merge_gitignore(root, (templates_dir() / "project" / GITIGNORE_TEMPLATE).read_text())
    result.branch = ctx["branch"]
    _init_git_and_dvc(root, result, ctx["branch"], log)
    return result


def merge_gitignore(root: Path, template: str) -> list[str]:
    """Append the template's entries missing from `root/.gitignore`; return those added."""
    path = root / ".gitignore"
    current = path.read_text() if path.exists() else ""
    have = {line.strip() for line in current.splitlines()}
    wanted = [line for line in template.splitlines() if line.strip() and not line.startswith("#")]
    missing = [line for line in wanted if line.strip() not in have]
    if not missing:
        return []
    block = [line for line in template.splitlines() if line.startswith("#") or line in missing]
    prefix = "" if not current or current.endswith("\n") else "\n"
    atomic_write_text(path, current + prefix + ("\n" if current else "") + "\n".join(block) + "\n")
    return missing


def _init_git_and_dvc(root: Path, result: ScaffoldResult, branch: str, log: Callable[[str], None]) -> None:
    top = _git_toplevel(root)
    if top is None:
        # the branch the apply workflow deploys from
        _run(["git", "init", "-q", "-b", branch], root, "git init")
        result.git_initialised = True
        top = root
        log(f"initialised git (branch {branch})")
    elif top != root:
        result.warnings.append(
            f"{root} is inside the git repository at {top}: GitHub reads workflows only from "
            f"{top / WORKFLOW_DIR}; move them there and set `defaults.run.working-directory`."
        )
    if not (root / ".dvc").is_dir():
        from llmops.integrations import dvcrun

        # As every DVC command llmops runs: `python -m dvc`, forked from the warm DVC interpreter.
        env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1"}
        args = ["init", "-q"] + (["--subdir"] if top != root else [])
        _check(dvcrun.run(root, args, env), root, "dvc init")
        result.dvc_initialised = True
        log("initialised DVC")


def _git_toplevel(root: Path) -> Path | None:
    top = _git_output(["rev-parse", "--show-toplevel"], root)
    return Path(top).resolve() if top else None


def _git_output(args: list[str], cwd: Path) -> str | None:
    """`git ARGS` run in `cwd`: its stripped output, or None when it fails or says nothing."""
    if shutil.which("git") is None:
        return None
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1"}
    _check(subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, check=False), cwd, what)


def _check(proc: subprocess.CompletedProcess[str], cwd: Path, what: str) -> None:
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ScaffoldError(
            f"`{what}` failed in {cwd} (exit {proc.returncode}): {detail[0]}; fix that and run `llmops init --force`."
        )
