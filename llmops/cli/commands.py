"""Core commands: validate, plan, apply, show, graph, force-unlock, lock."""

from __future__ import annotations

import json
from pathlib import Path

import click

from llmops.cli.main import EXIT_CHANGES, EXIT_ERROR, EXIT_INTERRUPTED
from llmops.errors import LlmopsError

project_dir = click.option("-C", "--chdir", "root", type=click.Path(file_okay=False, path_type=Path),
                           default=".", show_default=True, help="Project folder (holding llmops.yaml).")
target_opt = click.option("--target", "target", metavar="NAME", help="Apply the `targets.NAME` overlay.")


def make_console():
    """The console every command renders to (shared by the command modules)."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def open_at(root: Path, target: str | None):
    """The project in ROOT with the `targets.TARGET` overlay applied."""
    from llmops.engine.project import open_project

    return open_project(root, target=target)


@click.command("validate")
@project_dir
@target_opt
@click.option("--json", "as_json", is_flag=True, help="Machine-readable diagnostics.")
def validate_cmd(root: Path, target: str | None, as_json: bool) -> int:
    """Check llmops.yaml: syntax, schema, references, cycles, files, prompt examples."""
    from llmops.cli.github_actions import ActionsEnv
    from llmops.errors import ValidationError
    from llmops.config.validate import load_config

    gha = ActionsEnv.detect()
    try:
        config = load_config(root.resolve(), target=target)
    except ValidationError as exc:
        _report_to_actions(gha, "validate", exc, root, {"valid": "false", "errors": len(exc.diagnostics)})
        if as_json:
            click.echo(json.dumps({"valid": False, "diagnostics": [d.to_dict() for d in exc.diagnostics]}, indent=2))
        else:
            for d in exc.diagnostics:
                click.echo(d.format(), err=True)
            n = len(exc.diagnostics)
            click.echo(f"{n} error{'s' if n != 1 else ''} found.", err=True)
        return EXIT_ERROR
    except LlmopsError as exc:
        _report_to_actions(gha, "validate", exc, root, {"valid": "false"})
        raise
    if gha:
        gha.write_outputs({"valid": "true", "errors": 0, "resources": len(config.resources)})
    if as_json:
        click.echo(json.dumps({"valid": True, "diagnostics": [], "resources": list(config.resources)}, indent=2))
    else:
        click.echo(f"llmops.yaml is valid: {len(config.resources)} resources.")
    return 0


def _report_to_actions(gha, command: str, exc: LlmopsError, root: Path, outputs: dict) -> None:
    """In GitHub Actions: annotations (at the source line when known), the job summary, step outputs."""
    if gha is None:
        return
    from llmops.cli import github_actions as actions
    from llmops.errors import ValidationError

    root = root.resolve()
    if isinstance(exc, ValidationError):
        for line in actions.annotations(exc.diagnostics, root, gha.workspace):
            click.echo(line, err=True)
        gha.write_summary(actions.diagnostics_markdown(command, exc.diagnostics, root, gha.workspace))
    else:
        click.echo(actions.error_annotation(f"llmops {command}", exc.message), err=True)
        gha.write_summary(actions.error_markdown(command, exc.message))
    gha.write_outputs(outputs)


def _plan_options(f):
    f = click.option("--select", "select", multiple=True, metavar="ADDR",
                     help="Limit to these resources and what they need (repeatable).")(f)
    f = click.option("--replace", "replace", multiple=True, metavar="ADDR",
                     help="Force a rebuild of this resource (repeatable).")(f)
    f = click.option("--refresh", type=click.BOOL, default=True, show_default=True,
                     help="Read live state to detect drift; --refresh=false plans from the lock alone.")(f)
    return f


@click.command("plan")
@project_dir
@target_opt
@_plan_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (docs/plan-format.md).")
@click.option("--markdown", "as_markdown", is_flag=True, help="Print the plan as a pull-request comment.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), help="Save the plan for `llmops apply FILE`.")
@click.option("--detailed-exitcode", is_flag=True, help="Exit 0: no changes, 1: error, 2: changes present.")
def plan_cmd(root, target, select, replace, refresh, as_json, as_markdown, out, detailed_exitcode) -> int:
    """Compare llmops.yaml with llmops.lock and live state; show what apply would do."""
    from llmops.cli.github_actions import ActionsEnv, plan_outputs
    from llmops.operations.plan_markdown import plan_to_markdown
    from llmops.engine.planner import make_plan

    gha = ActionsEnv.detect()
    try:
        project = open_at(root, target)
        plan = make_plan(project, refresh=refresh, select=select, replace=replace)
    except LlmopsError as exc:
        _report_to_actions(gha, "plan", exc, root, {"error": "true"})
        raise
    if out:
        from llmops.engine.planfile import save_plan

        save_plan(plan, out)
    markdown = plan_to_markdown(plan, project_name=str(project.config.data.get("project", ""))) \
        if gha or as_markdown else ""
    if gha:
        gha.write_summary(markdown)
        gha.write_outputs(plan_outputs(plan))
    if as_json:
        from llmops.engine.planfile import plan_to_json

        click.echo(plan_to_json(plan), nl=False)
    elif as_markdown:
        click.echo(markdown)
    else:
        from llmops.cli.render import render_plan

        console = make_console()
        render_plan(console, plan)
        if out:
            console.print(f"\nSaved the plan to {out}. Apply exactly it with `llmops apply {out}`.")
    return EXIT_CHANGES if detailed_exitcode and plan.has_changes else 0


def _lock_timeout_opt(f):
    return click.option("--lock-timeout", "lock_timeout", default="0", show_default=True, metavar="DURATION",
                        help="Wait this long (30s, 2m) for another apply's lock before giving up.")(f)


@click.command("apply")
@click.argument("planfile", required=False, type=click.Path(dir_okay=False, path_type=Path))
@project_dir
@target_opt
@_plan_options
@click.option("--auto-approve", is_flag=True, help="Do not ask for confirmation.")
@click.option("--parallelism", type=click.IntRange(min=1), help="Resources applied at once (default: settings.parallelism).")
@click.option("--keep-going", is_flag=True, help="After a failure, go on with everything that does not depend on it.")
@click.option("--approved-by", metavar="NAME",
              help="Approve `approval: required` promotions outside GitHub (needs settings.allow_local_approvals).")
@_lock_timeout_opt
def apply_cmd(planfile, root, target, select, replace, refresh, auto_approve, parallelism, keep_going,
              approved_by, lock_timeout) -> int:
    """Apply the changes (or exactly those of a saved PLANFILE) and record them in llmops.lock."""
    from llmops.engine.apply import apply_plan
    from llmops.engine.applylock import ApplyLock, parse_duration
    from llmops.cli.render import RichHooks, render_plan, render_report
    from llmops.engine.planner import check_saved_plan, make_plan

    console = make_console()
    project = open_at(root, target)
    if approved_by:
        project.options["approved_by"] = approved_by
    with ApplyLock.for_project(project, command="apply", timeout=parse_duration(lock_timeout)) as lock:
        project.reload_lock()  # another apply may have finished while this one waited for the lock
        if lock.took_over:
            console.print(f"[yellow]Note: took over a stale apply lock ({lock.took_over.describe()}); "
                          "that apply died, resuming from llmops.lock.[/]")
        if planfile:
            from llmops.engine.planfile import load_plan

            plan = load_plan(planfile)
            check_saved_plan(project, plan)
        else:
            plan = make_plan(project, refresh=refresh, select=select, replace=replace)
        render_plan(console, plan)
        if not plan.has_changes:
            return 0
        if not planfile and not auto_approve:
            try:
                answer = click.prompt("\nApply these changes? Only 'yes' is accepted", default="",
                                      show_default=False)
            except click.exceptions.Abort:
                from llmops.errors import LlmopsError

                raise LlmopsError("no answer to the confirmation (standard input is closed); nothing was "
                                  "changed. Pass --auto-approve to apply without asking (as CI does).") from None
            if answer.strip() != "yes":
                console.print("Apply cancelled; nothing was changed.")
                return EXIT_ERROR
        with RichHooks(console) as hooks:
            report = apply_plan(project, plan, hooks=hooks, parallelism=parallelism, keep_going=keep_going)
        render_report(console, report)
        if lock.lost:
            console.print(f"[yellow]Warning: {lock.lost}; another apply may have run meanwhile: run `llmops plan`.[/]")
    if report.interrupted:
        return EXIT_INTERRUPTED
    return 0 if report.ok else EXIT_ERROR


@click.command("show")
@click.argument("address", required=False)
@project_dir
@target_opt
@click.option("--json", "as_json", is_flag=True)
@click.option("--refresh", type=click.BOOL, default=True, show_default=True, help="Also read live status.")
def show_cmd(address, root, target, as_json, refresh) -> int:
    """Show the lock's record (and live status) of every resource, or of ADDRESS."""
    from llmops.operations.show import show_resources

    project = open_at(root, target)
    rows = show_resources(project, address, refresh=refresh)
    if as_json:
        click.echo(json.dumps(rows if address is None else rows[0], indent=2, sort_keys=True, default=str))
        return 0
    from llmops.cli.show import render_show

    render_show(make_console(), rows, detailed=address is not None)
    return 0


@click.command("graph")
@project_dir
@target_opt
@click.option("--format", "fmt", type=click.Choice(["mermaid", "dot"]), default="mermaid", show_default=True)
def graph_cmd(root, target, fmt) -> int:
    """Print the dependency graph of llmops.yaml."""
    from llmops.operations.show import graph_text
    from llmops.config.validate import load_config

    config = load_config(root.resolve(), target=target)
    click.echo(graph_text(config, fmt), nl=False)
    return 0


@click.command("force-unlock")
@click.argument("lock_id")
@project_dir
@target_opt
def force_unlock_cmd(lock_id, root, target) -> int:
    """Remove the apply lock LOCK_ID (local, and shared in the model registry) of an apply that is gone."""
    from llmops.engine.applylock import force_unlock_project

    holder = force_unlock_project(root, lock_id, target=target)
    click.echo(f"Removed the apply lock held by {holder.describe()}.")
    return 0


@click.command("lock")
@project_dir
@target_opt
@click.option("--check", is_flag=True, required=True, help="Exit 1 when llmops.lock does not match llmops.yaml.")
def lock_cmd(root, target, check) -> int:
    """Check that llmops.lock records exactly what llmops.yaml declares (no refresh)."""
    from llmops.engine.planner import make_plan

    plan = make_plan(open_at(root, target), refresh=False)
    if not plan.has_changes:
        click.echo("llmops.lock matches llmops.yaml.")
        return 0
    click.echo("llmops.lock does not match llmops.yaml; run `llmops apply` and commit llmops.lock:", err=True)
    for c in plan.changes:
        if c.action != "no-op":
            click.echo(f"  {c.action:8} {c.address}: {'; '.join(c.reasons)}", err=True)
    return EXIT_ERROR


@click.command("rollback")
@click.argument("address")
@project_dir
@target_opt
@_lock_timeout_opt
def rollback_cmd(address, root, target, lock_timeout) -> int:
    """Point deployment ADDRESS's alias back at its previous version (recorded in the lock)."""
    from llmops.engine.applylock import parse_duration
    from llmops.operations.deployment import rollback_deployment

    entry = rollback_deployment(open_at(root, target), address, lock_timeout=parse_duration(lock_timeout))
    out = entry.outputs
    click.echo(f"{entry.address}: alias {out['alias']} of {out['model_name']} now points to v{out['version']} "
               f"(was v{out.get('rolled_back_from')}); recorded in llmops.lock.")
    return 0


@click.command("down")
@click.argument("address")
@project_dir
@target_opt
@_lock_timeout_opt
def down_cmd(address, root, target, lock_timeout) -> int:
    """Stop deployment ADDRESS's server (its registry alias stays)."""
    from llmops.engine.applylock import parse_duration
    from llmops.operations.deployment import stop_deployment

    stopped = stop_deployment(open_at(root, target), address, lock_timeout=parse_duration(lock_timeout))
    click.echo("Server stopped." if stopped else "No server was running.")
    return 0
