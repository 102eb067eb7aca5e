"""The `llmops` command group and the one place exceptions become exit codes."""

from __future__ import annotations

import sys

import click

from llmops import __version__

EXIT_ERROR = 1
EXIT_CHANGES = 2
EXIT_INTERRUPTED = 130


class LazyGroup(click.Group):
    """Subcommands are imported only when invoked, keeping `llmops --help` fast."""

    def __init__(self, *args, lazy: dict[str, tuple[str, str, str]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            import importlib

            module, attr, _ = self.lazy[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, self.lazy[name][2]) for name in self.list_commands(ctx) if name in self.lazy]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


_C = "llmops.cli.commands"
COMMANDS = {
    "validate": (_C, "validate_cmd", "Check llmops.yaml and report every problem at once."),
    "plan": (_C, "plan_cmd", "Show what apply would change, and why."),
    "apply": (_C, "apply_cmd", "Make it so: run the plan in dependency order and record it in llmops.lock."),
    "show": (_C, "show_cmd", "Show the lock's contents and live status of resources."),
    "graph": (_C, "graph_cmd", "Print the dependency graph (Mermaid or DOT)."),
    "force-unlock": (_C, "force_unlock_cmd", "Remove a stale apply lock left by a crashed apply."),
    "lock": (_C, "lock_cmd", "Check that llmops.lock matches llmops.yaml (for required status checks)."),
    "rollback": (_C, "rollback_cmd", "Move a deployment's alias back to its previous version."),
    "down": (_C, "down_cmd", "Stop a deployment's server."),
    "monitor": ("llmops.cli.monitor", "monitor_cmd",
                "Check served traffic: drift, feedback, latency, errors; exit 3 on alerts."),
    "feedback": ("llmops.cli.monitor", "feedback_group", "Export human feedback as a dataset."),
    "init": ("llmops.cli.gitops", "init_command", "Scaffold a new project in the current folder."),
    "pr": ("llmops.cli.gitops", "pr_group", "Pull-request helpers (sticky plan comment)."),
}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmops")
@click.option("-C", "--chdir", "chdir", metavar="DIR", type=click.Path(exists=True, file_okay=False),
              help="Run as if llmops was started in DIR (like git -C).")
def cli(chdir: str | None) -> None:
    """llmops: declarative GitOps for fine-tuned language models.

    Declare datasets, prompts, base models, fine-tunes, evals, deployments and monitors in
    llmops.yaml; `llmops plan` shows what would change; `llmops apply` makes it so and
    records the result in llmops.lock.
    """
    if chdir:
        import os

        os.chdir(chdir)


def _quiet_environment() -> None:
    """No telemetry from the libraries llmops drives, and no INFO chatter from MLflow."""
    import os

    for key, value in {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_CONFIGURE_LOGGING": "false",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }.items():
        os.environ.setdefault(key, value)


def main(argv: list[str] | None = None) -> None:
    from llmops.errors import LlmopsError

    _quiet_environment()
    try:
        rv = cli.main(args=argv, prog_name="llmops", standalone_mode=False)
    except LlmopsError as exc:
        click.echo(f"Error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(EXIT_ERROR)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_ERROR)  # usage errors are errors (1); 2 means "changes" for plan
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - a bug: one clear line, the traceback on request
        import os

        if os.environ.get("LLMOPS_DEBUG"):
            raise
        click.echo(f"Error: unexpected {type(exc).__name__}: {exc}. This is a bug in llmops; run again with "
                   "LLMOPS_DEBUG=1 for the traceback and report it.", err=True)
        sys.exit(EXIT_ERROR)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
