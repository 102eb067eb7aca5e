"""Terminal rendering of plans, apply progress and lock entries (rich)."""

from __future__ import annotations

import threading
from typing import Any

from rich.console import Console
from rich.markup import escape

from llmops.engine.apply import ApplyHooks, ApplyReport
from llmops.engine.cost import describe as describe_cost
from llmops.engine.cost import describe_total
from llmops.engine.plan import Plan, ResourceChange
from llmops.providers.base import ProgressEvent

# `<=` is Terraform's symbol for reading (a data source): a restore reads a shared store.
SYMBOL = {"create": "+", "update": "~", "restore": "<=", "replace": "-/+", "delete": "-", "no-op": " "}
STYLE = {"create": "green", "update": "yellow", "restore": "cyan", "replace": "magenta", "delete": "red",
         "no-op": "dim"}


def render_plan(console: Console, plan: Plan, show_noop: bool = False) -> None:
    changes = [c for c in plan.changes if show_noop or c.action != "no-op"]
    for address, alert in plan.alerts:
        console.print(f"[red bold]  ! {escape(address)}[/] [red]alert: {escape(alert)}[/]")
    if plan.alerts:
        console.print()
    if not plan.has_changes:
        console.print("[green]No changes.[/] llmops.yaml, llmops.lock and live state agree.")
        return
    width = max(len(c.address) for c in changes)
    for c in changes:
        style = STYLE[c.action]
        sym = SYMBOL[c.action]
        label = c.action if c.action != "no-op" else "no changes"
        extra = ""
        simple = {k: v for k, v in (c.details or {}).items() if not isinstance(v, dict)}
        if simple:
            extra = "  [dim](" + ", ".join(f"{k}: {v}" for k, v in simple.items()) + ")[/]"
        console.print(f"[{style}]{sym:>3} {escape(c.address):<{width}}  {label}[/]{extra}")
        for reason in c.reasons:
            console.print(f"        [dim]{escape(reason)}[/]")
        cost = (c.details or {}).get("cost")
        if isinstance(cost, dict) and c.action in ("create", "replace"):
            console.print(f"        [cyan]cost: {escape(describe_cost(cost))}[/]")
        _metric_table(console, c)
    console.print()
    console.print(f"[bold]{plan.summary_line()}[/]")
    total = plan.cost()
    if total:
        console.print(f"[cyan]{escape(describe_total(total))}[/]")


def _metric_table(console: Console, c: ResourceChange) -> None:
    table = (c.details or {}).get("metrics")
    if not table or c.action == "no-op":
        return
    other = (c.details or {}).get("compared_to")
    for metric, row in table.items():
        last = row.get("last")
        value = f"{last:.4g}" if isinstance(last, (int, float)) else "-"
        if other and isinstance(row.get("compared"), (int, float)) and isinstance(row.get("delta"), (int, float)):
            value += f" (vs {row['compared']:.4g} for {escape(other)}: {row['delta']:+.4g})"
        check = ""
        if "threshold" in row:
            verdict = {True: "[green]passes[/]", False: "[red]fails[/]"}.get(row.get("passes"), "")
            check = f"  threshold {escape(row['threshold'])} {verdict}"
        console.print(f"        [dim]last applied {escape(metric)} = {value}[/]{check}")


class RichHooks(ApplyHooks):
    """Apply progress: a live progress display in a terminal, plain lines elsewhere (CI)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.lock = threading.Lock()
        self.bar = None
        self.tasks: dict[str, Any] = {}
        if console.is_terminal:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=console, transient=False,
            )

    def __enter__(self) -> "RichHooks":
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()

    def pre_apply(self, change: ResourceChange) -> None:
        verb = {"create": "creating", "update": "updating", "restore": "restoring", "replace": "replacing",
                "delete": "deleting"}[change.action]
        if self.bar:
            self.tasks[change.address] = self.bar.add_task(f"{change.address} ({verb})", total=None, note="")
        else:
            self.console.print(f"{change.address}: {verb}...")

    def post_apply(self, change: ResourceChange, error: BaseException | None) -> None:
        task = self.tasks.get(change.address)
        if self.bar and task is not None:
            t = self.bar.tasks[task]
            self.bar.update(task, total=t.total or 1, completed=t.total or 1,
                                 note="[red]failed[/]" if error else "[green]done[/]")
        if error is None:
            self.console.print(f"[green]{change.address}: {change.action} complete[/]")
        else:
            msg = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
            self.console.print(f"[red]{change.address}: failed:[/] {escape(_unprefixed(change.address, msg))}")

    def recorded(self, change: ResourceChange, outputs: dict, summary: str = "") -> None:
        if summary:  # the provider's one line (`Provider.summary`)
            self.console.print(f"[dim]  {escape(change.address)}: {escape(summary)}[/]")

    def progress(self, address: str, event: ProgressEvent) -> None:
        task = self.tasks.get(address)
        if self.bar and task is not None:
            self.bar.update(task, total=event.total, completed=event.completed, note=escape(event.message))

    def log(self, address: str, message: str) -> None:
        self.console.print(f"[dim]{escape(address)}: {escape(message)}[/]")

    def skipped(self, address: str, reason: str) -> None:
        self.console.print(f"[yellow]{address}: skipped ({escape(reason)})[/]")


def render_report(console: Console, report: ApplyReport) -> None:
    console.print()
    parts = [f"{len(report.applied)} applied"]
    if report.failed:
        parts.append(f"{len(report.failed)} failed")
    if report.skipped:
        parts.append(f"{len(report.skipped)} skipped")
    if report.interrupted:
        console.print("[red bold]Apply interrupted:[/] " + ", ".join(parts) + ". llmops.lock records what finished; run `llmops apply` again to resume.")
    elif report.failed or report.skipped:
        console.print("[red bold]Apply failed:[/] " + ", ".join(parts) + ".")
        for addr, msg in report.failed.items():
            console.print(f"  [red]{addr}[/]: {escape(_unprefixed(addr, msg))}")
        for addr, why in report.skipped.items():
            console.print(f"  [yellow]{addr}[/]: skipped ({escape(why)})")
    else:
        console.print("[green bold]Apply complete:[/] " + ", ".join(parts) + ".")


def _unprefixed(address: str, message: str) -> str:
    """Messages often start with their address; the renderer already shows it."""
    return message[len(address) + 2:] if message.startswith(f"{address}: ") else message
