"""GitOps commands: `llmops init` and `llmops pr comment`.

Each command calls one library function (`llmops.operations.scaffold.init_project`,
`llmops.gitops.comments.comment_on_pr`) and renders its result. LlmopsError is left to
the main CLI, which turns it into a message and an exit code. Registered in
`llmops.cli.main` as `init_command` and `pr_group`.
"""

from __future__ import annotations

from pathlib import Path

import click

from llmops.gitops.comments import PLAN_MARKER, comment_on_pr
from llmops.operations.scaffold import default_requirement, init_project


@click.command("init")
@click.option("--force", is_flag=True, help="Overwrite files that llmops init would write.")
@click.option("--name", help="Project name (default: the folder's name).")
@click.option(
    "--branch",
    help="Branch the workflows deploy from (default: origin's HEAD, the current branch, "
    "git's init.defaultBranch, else main).",
)
@click.option(
    "--requirement",
    metavar="REQ",
    help="The requirements.txt line that installs llmops in CI, e.g. "
    f"'git+https://github.com/ORG/REPO@TAG' (default: {default_requirement()}, this release).",
)
def init_command(force: bool, name: str | None, branch: str | None, requirement: str | None) -> None:
    """Scaffold an llmops project (config, sample data, workflows, git, DVC) here."""
    result = init_project(Path.cwd(), name=name, force=force, branch=branch, requirement=requirement)
    click.echo(f"Scaffolded llmops project '{result.project}' in {result.root} (workflows deploy from {result.branch})")
    for rel in result.written:
        click.echo(f"  {'overwrote' if rel in result.overwritten else 'created  '} {rel}")
    if result.gitignore_added:
        click.echo(f"  .gitignore += {', '.join(result.gitignore_added)}")
    if result.git_initialised:
        click.echo("  initialised git")
    if result.dvc_initialised:
        click.echo("  initialised DVC")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo("\nNext: `llmops plan`, then `llmops apply`; commit with `git add -A && git commit -m 'llmops init'`.")


@click.group("pr")
def pr_group() -> None:
    """Pull-request helpers for CI (GitHub)."""


@pr_group.command("comment")
@click.option(
    "--body-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Markdown to post (e.g. the output of `llmops plan --markdown`).",
)
@click.option(
    "--plan",
    "plan_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A plan saved by `llmops plan --out FILE`: post it rendered as markdown.",
)
@click.option("--pr", "pr_number", type=int, help="Pull request number (default: from GITHUB_EVENT_PATH).")
@click.option("--marker", default=PLAN_MARKER, show_default=True, help="Hidden marker that finds the comment to update.")
def comment_command(body_file: Path | None, plan_file: Path | None, pr_number: int | None, marker: str) -> None:
    """Create or update the one sticky llmops comment on a pull request."""
    if (body_file is None) == (plan_file is None):
        raise click.UsageError("give exactly one of --body-file or --plan.")
    if plan_file is not None:
        from llmops.gitops.comments import post_sticky_comment
        from llmops.operations.plan_markdown import plan_to_markdown
        from llmops.engine.planfile import load_plan

        body = plan_to_markdown(load_plan(plan_file))
        result = post_sticky_comment(body, pr_number=pr_number, marker=marker)
    else:
        result = comment_on_pr(body_file, pr_number=pr_number, marker=marker)
    click.echo(f"{result.action} comment {result.comment_id} on pull request #{result.pr_number}: {result.url}")
