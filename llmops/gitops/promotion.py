"""May this checkout promote a protected deployment? The rules, checked against git and GitHub.

A deployment with `approval: required` is promoted from GitHub Actions only when all hold:

1. the working tree is clean (what llmops itself writes during apply aside: `.llmops/`,
   `llmops.lock`, `dvc.yaml`, `dvc.lock`, `.dvc/`, `.dvcignore`), and HEAD is `GITHUB_SHA`;
2. every commit since the last applied commit (`approval.applied_commit` in llmops.lock; when
   there is none, since the commit that made the deployment protected) that changed the
   deployment or anything it depends on — its llmops.yaml entry, the entries upstream of it,
   what the monitor watching it has its server log (`store`, `log_text`: `request_log`), the
   top-level settings/targets, and the files they name — came through a pull request that
   was merged into the repository's default branch;
3. each such pull request was approved on its last commit by someone other than its author who
   is allowed by the config and CODEOWNERS *at the pull request's base commit* (a pull request
   cannot name its own approvers), and no reviewer's latest word on it is "changes requested".

`check_promotion` returns an `Approval`; a refusal names its rule and what to do. It never
approves on doubt: GitHub or git failing raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from llmops.engine.addrs import KINDS
from llmops.config.document import CONFIG_NAME, apply_target, parse_document
from llmops.errors import LlmopsError
from llmops.gitops.approval import (
    RULE_CLEAN_TREE,
    RULE_DEFAULT_BRANCH,
    RULE_HEAD,
    RULE_MERGED_PR,
    Approval,
    allowed_approvers,
    approvers_in,
    check_local_approval,
    review_pull_request,
)
from llmops.gitops.codeowners import find_codeowners, parse_codeowners
from llmops.gitops.github import GitHubClient
from llmops.gitops.gitrepo import GitError, GitRepo
from llmops.config.refs import references, resolve

# Paths (project-relative) that `llmops apply` writes before a deployment is promoted; a
# change there is llmops' own work, not an unreviewed edit.
LLMOPS_WRITES = (".llmops/", "llmops.lock", "dvc.yaml", "dvc.lock", ".dvc/", ".dvcignore")
_MODULE_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_SHOWN = 5


@dataclass(frozen=True)
class PromotionRequest:
    """One protected promotion to check.

    `config` is the resolved llmops.yaml being applied (target overlay in); `applied_commit` is
    the commit the lock says this deployment was last promoted from (None: never);
    `github_sha` is GITHUB_SHA of the workflow run.
    """

    project_root: Path
    name: str
    config: Mapping[str, Any]
    github_sha: str
    applied_commit: str | None = None
    target: str | None = None


def check_promotion(client: GitHubClient, request: PromotionRequest) -> Approval:
    """Apply the rules in this module's docstring, in order; the first that fails refuses."""
    repo = GitRepo.open(request.project_root)
    refusal = check_checkout(repo, request.github_sha)
    if refusal:
        return refusal
    head = repo.head()
    addresses, files = deployment_inputs(request.config, request.name, request.project_root)
    since = _since(repo, request, head)
    commits = _changes(repo, since, head, addresses, files, request.name)
    if not commits:
        when = f"since the approved commit {since[:12]}" if since else "in its history"
        return Approval(True, applied_commit=head, reason=f"nothing deployments.{request.name} depends on changed {when}")
    default_branch = str(client.repository()["default_branch"])
    checked: dict[int, Approval] = {}
    pr_commits: dict[int, set[str]] = {}
    for sha in commits:
        pr = _pull_request_of(client, sha, default_branch, pr_commits)
        if isinstance(pr, Approval):
            return pr
        number = int(pr["number"])
        if number not in checked:
            allowed = _base_approvers(repo, pr, request)
            checked[number] = review_pull_request(client, pr, allowed)
        if not checked[number].approved:
            return checked[number]
    newest = checked[next(iter(checked))]
    prs = list(checked)
    what = f"pull request #{prs[0]}" if len(prs) == 1 else "pull requests " + ", ".join(f"#{n}" for n in prs)
    return Approval(True, approver=newest.approver, pr_number=newest.pr_number, commit=newest.commit,
                    applied_commit=head, pull_requests=prs,
                    reason=f"{what} changed deployments.{request.name}, each approved on its last commit "
                           f"(newest: #{newest.pr_number} by {newest.approver})")


def check_local_promotion(approved_by: str, project_root: Path, deployment: Mapping[str, Any],
                          settings: Mapping[str, Any]) -> Approval:
    """`--approved-by NAME` outside GitHub: allowed by settings.allow_local_approvals, and bound to
    a commit like a GitHub approval (a git checkout whose working tree is clean)."""
    try:
        repo = GitRepo.open(project_root)
    except GitError:
        repo = None
    top, config = (repo.top, repo.rel(CONFIG_NAME)) if repo else (project_root, CONFIG_NAME)
    result = check_local_approval(approved_by, settings, allowed_approvers(deployment, settings, top, config))
    if not result.approved:
        return result
    if repo is None:
        return replace(result, approved=False, rule=RULE_CLEAN_TREE, reason=(
            "the project is not in a git repository, and an approval is bound to a commit: "
            "`git init`, commit the project, and re-run"))
    refusal = check_checkout(repo, "")
    if refusal:
        return replace(refusal, approver=result.approver, source="local")
    return replace(result, applied_commit=repo.head())


# -- rule 1: what is checked out is what was merged ----------------------------------------------


def check_checkout(repo: GitRepo, github_sha: str) -> Approval | None:
    """A refusal when the working tree has changes llmops did not make, or HEAD is not `github_sha`."""
    ours = [(repo.rel(p.rstrip("/")), p.endswith("/")) for p in LLMOPS_WRITES]
    dirty = [f"{code.strip()} {path}" for code, path in repo.status()
             if not any(path == o or (folder and path.startswith(o + "/")) for o, folder in ours)]
    if dirty:
        shown = ", ".join(dirty[:_SHOWN]) + (f" and {len(dirty) - _SHOWN} more" if len(dirty) > _SHOWN else "")
        return Approval(False, rule=RULE_CLEAN_TREE, reason=(
            f"the working tree has changes that no pull request reviewed ({shown}); a protected promotion "
            "applies only committed, merged content: apply from a clean checkout of the merge commit "
            "(commit the changes through a pull request, or discard them with `git stash -u`)"))
    head = repo.head()
    if github_sha and head != github_sha:
        return Approval(False, rule=RULE_HEAD, commit=head, reason=(
            f"HEAD is {head[:12]} but GITHUB_SHA is {github_sha[:12]}; the approval checked is for the commit "
            "the workflow runs on: check out that commit (actions/checkout without `ref:`) and re-run"))
    return None


# -- rule 2: which commits changed what the deployment depends on -----------------------------


def deployment_inputs(config: Mapping[str, Any], name: str, project_root: Path) -> tuple[set[str], list[str]]:
    """(addresses, files): deployments.NAME and every resource upstream of it, and the
    project-relative files and folders those entries name (existing ones)."""
    names = {k: set((config.get(k) or {}).keys()) if isinstance(config.get(k), dict) else set() for k in KINDS}
    start = f"deployments.{name}"
    seen, todo = {start}, [start]
    while todo:
        addr = todo.pop()
        kind, _, rname = addr.partition(".")
        for ref in references(kind, rname, _spec(config, addr)):
            target = resolve(ref, names)
            if ref.edge and target and target not in seen:
                seen.add(target)
                todo.append(target)
    files: set[str] = set()
    for addr in seen:
        kind = addr.partition(".")[0]
        for key, value in _strings(_spec(config, addr)):
            files.update(_named_paths(project_root, kind, key, value))
    return seen, sorted(files)


def request_log(config: Mapping[str, Any], deployment: str) -> dict[str, Any]:
    """What the monitor watching `deployment` has its server log: {monitor: {store, log_text}}.
    A monitor is downstream of the deployment, but the deployment's apply restarts the server
    with these settings (refresh drift `request-log`), so for a protected deployment they need
    the approval too. Its other settings (thresholds, webhook) change no server and need none."""
    from llmops.monitor.spec import monitor_deployment

    monitors = config.get("monitors")
    if not isinstance(monitors, dict):
        return {}
    out: dict[str, Any] = {}
    for name, spec in monitors.items():
        spec = spec if isinstance(spec, dict) else {}
        if monitor_deployment(str(name), spec) == deployment:
            out[str(name)] = {"store": spec.get("store"), "log_text": spec.get("log_text")}
    return out


def _spec(config: Mapping[str, Any], addr: str) -> Any:
    kind, _, name = addr.partition(".")
    block = config.get(kind)
    return block.get(name) if isinstance(block, dict) else None


def _strings(value: Any, key: str = "") -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [(key, value)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(v, str(k))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v, key)]
    return []


def _named_paths(root: Path, kind: str, key: str, value: str) -> list[str]:
    """Project files a spec string names: a file or folder (and its `.dvc` pointer when DVC
    tracks it: git then holds only the pointer), a custom metric's module, and for a prompt
    template the folder it may include from."""
    candidates = [value]
    if _MODULE_RE.fullmatch(value):
        module = value.partition(":")[0].replace(".", "/")
        candidates = [f"{module}.py", module]
    found = []
    for rel in candidates:
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or not rel.strip() or "\n" in rel:
            continue
        try:
            exists, pointer = (root / rel).exists(), (root / f"{rel}.dvc").is_file()
        except (OSError, ValueError):
            continue
        if exists or pointer:
            found.append(pure.as_posix())
            if pointer:
                found.append(f"{pure.as_posix()}.dvc")
            if kind == "prompts" and key == "template" and str(pure.parent) != ".":
                found.append(pure.parent.as_posix())
    return found


def _since(repo: GitRepo, request: PromotionRequest, head: str) -> str | None:
    """Where the history to check starts (exclusive); None: from the root."""
    locked = request.applied_commit
    if locked and re.fullmatch(r"[0-9a-f]{40}", locked) and repo.has_commit(locked) and repo.is_ancestor(locked, head):
        return locked
    # Never promoted (or the lock names a commit outside this history): everything since the
    # deployment became protected; its reviewer accepted what was there before.
    config = repo.rel(CONFIG_NAME)
    for sha in repo.commits_touching(None, head, [config]):
        if not _protected_at(repo, sha, config, request):
            continue
        parents = repo.parents(sha)
        if not parents:
            return None
        if not any(_protected_at(repo, p, config, request) for p in parents):
            return parents[0]
    return None


def _protected_at(repo: GitRepo, sha: str, config_path: str, request: PromotionRequest) -> bool:
    data = _config_at(repo, sha, config_path, request.target)
    spec = _spec(data or {}, f"deployments.{request.name}")
    return isinstance(spec, dict) and spec.get("approval") == "required"


def _config_at(repo: GitRepo, sha: str, config_path: str, target: str | None) -> dict[str, Any] | None:
    """llmops.yaml at commit `sha` (target overlay applied); None when absent or unreadable."""
    text = repo.show(sha, config_path)
    if text is None:
        return None
    try:
        doc = apply_target(parse_document(text, config_path), target)
    except LlmopsError:
        return None
    return doc.data if isinstance(doc.data, dict) else None


def _changes(repo: GitRepo, since: str | None, head: str, addresses: set[str], files: list[str],
             deployment: str) -> list[str]:
    """Commits (newest first) in since..head that changed the deployment's inputs: any named
    file, or llmops.yaml where the deployment's entries, what its server logs (`request_log`)
    or the top-level settings changed."""
    config = repo.rel(CONFIG_NAME)
    file_paths = [repo.rel(f) for f in files]
    touched = set(repo.commits_touching(since, head, file_paths)) if file_paths else set()
    ordered = repo.commits_touching(since, head, [config, *file_paths])
    out = []
    for sha in ordered:
        if sha in touched or _config_changed(repo, sha, config, addresses, deployment):
            out.append(sha)
    return out


def _config_changed(repo: GitRepo, sha: str, config_path: str, addresses: set[str], deployment: str) -> bool:
    def relevant(rev: str) -> Any:
        text = repo.show(rev, config_path)
        if text is None:
            return None
        try:
            data = parse_document(text, config_path).data
        except LlmopsError:
            return ("unreadable", text)  # an unparsable version counts as a change
        if not isinstance(data, dict):
            return ("not a mapping", text)
        picked = {k: v for k, v in data.items() if k not in KINDS}
        picked.update({a: _spec(data, a) for a in sorted(addresses)})
        picked["request_log"] = request_log(data, deployment)
        return picked

    mine = relevant(sha)
    parents = repo.parents(sha)
    return not parents or all(relevant(p) != mine for p in parents)


# -- rules 2-3: the pull request behind each commit, and its reviews -----------------------------


def _pull_request_of(client: GitHubClient, sha: str, default_branch: str,
                     pr_commits: dict[int, set[str]]) -> dict[str, Any] | Approval:
    """The pull request merged into the default branch that brought commit `sha` in: the one
    whose merge commit it is, or whose commits include it (`pr_commits` caches those lists).
    A refusal otherwise."""
    pulls = client.get_paginated(client.repo_path(f"commits/{sha}/pulls"))
    merged = [p for p in pulls if p.get("merged_at")]
    into_default = [p for p in merged if (p.get("base") or {}).get("ref") == default_branch]
    for pr in into_default:
        if pr.get("merge_commit_sha") == sha:
            return pr
    for pr in into_default:
        number = int(pr["number"])
        if number not in pr_commits:
            listed = client.get_paginated(client.repo_path(f"pulls/{number}/commits"))
            pr_commits[number] = {str(c.get("sha")) for c in listed if isinstance(c, dict)}
        if sha in pr_commits[number]:
            return pr
    short = sha[:12]
    if into_default:
        numbers = ", ".join(f"#{p['number']}" for p in into_default)
        return Approval(False, commit=sha, rule=RULE_MERGED_PR, reason=(
            f"commit {short} changed the deployment but is not one that pull request {numbers} merged (it is "
            "only associated with it); push changes through a pull request of their own"))
    if merged:
        p = merged[0]
        return Approval(False, pr_number=int(p["number"]), commit=sha, rule=RULE_DEFAULT_BRANCH, reason=(
            f"commit {short} came through pull request #{p['number']}, which was merged into "
            f"{(p.get('base') or {}).get('ref')!r}, not the default branch {default_branch!r}; only what is "
            f"reviewed into {default_branch!r} is promoted"))
    if pulls:
        numbers = ", ".join(f"#{p['number']}" for p in pulls)
        return Approval(False, commit=sha, rule=RULE_MERGED_PR, reason=(
            f"commit {short} changed the deployment and is associated only with pull request {numbers}, "
            "which is not merged; merge it through its pull request after review"))
    return Approval(False, commit=sha, rule=RULE_MERGED_PR, reason=(
        f"commit {short} changed the deployment without a pull request (pushed directly); protected "
        "promotions need every change reviewed in a pull request: revert it and open one"))


def _base_approvers(repo: GitRepo, pr: Mapping[str, Any], request: PromotionRequest) -> list[str]:
    """Who may approve pull request `pr`: llmops.yaml's approvers, else the CODEOWNERS owners of
    llmops.yaml, all read at the pull request's base commit."""
    base = str((pr.get("base") or {}).get("sha") or "")
    if not re.fullmatch(r"[0-9a-f]{40}", base):
        raise LlmopsError(f"GitHub gave pull request #{pr.get('number')} no base commit; re-run, and report it "
                          "if it persists.")
    config_path = repo.rel(CONFIG_NAME)
    data = _config_at(repo, base, config_path, request.target) or {}
    named = approvers_in(_spec(data, f"deployments.{request.name}"), data.get("settings"))
    if named:
        return named
    found = find_codeowners(lambda rel: repo.show(base, rel))
    return parse_codeowners(found[1], config_path) if found else []
