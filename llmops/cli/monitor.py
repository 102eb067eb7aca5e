"""`llmops monitor` and `llmops feedback export`: run monitors, export rated requests.

`monitor_cmd` exits 3 when any monitor raised an alert (0 when none, 1 on error), so a
scheduled job can page on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from llmops.cli.commands import make_console, open_at, project_dir, target_opt

EXIT_ALERTS = 3


@click.command("monitor")
@click.argument("name", required=False)
@project_dir
@target_opt
@click.option("--json", "as_json", is_flag=True, help="Print the monitors' reports as JSON.")
@click.option("--html", is_flag=True, help="Also write an HTML report under .llmops/reports/monitor/NAME/.")
def monitor_cmd(name: str | None, root: Path, target: str | None, as_json: bool, html: bool) -> int:
    """Check served traffic of every monitor (or NAME): drift, feedback, latency, errors, clients.

    Exits 3 when any alert is raised, 0 otherwise.
    """
    from llmops.monitor.run import run_project_monitors

    warnings: list[str] = []
    outcomes = run_project_monitors(open_at(root, target), name, html=html, log=warnings.append)
    for message in warnings:
        click.echo(f"Warning: {message}", err=True)
    if as_json:
        click.echo(json.dumps([o.to_dict() for o in outcomes], indent=2, sort_keys=True, default=str))
    else:
        console = make_console()
        for outcome in outcomes:
            _render(console, outcome)
    return EXIT_ALERTS if any(o.report.alerts for o in outcomes) else 0


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "-"
    if pct:
        return f"{float(value):.1%}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    req, lat, fb, drift = m["requests"], m["latency_ms"], m["feedback"], m["drift"]
    rows = [("requests", f"{req['count']} ({m['window']})"),
            ("error rate", _fmt(m["error_rate"], pct=True)),
            ("latency p50 / p95 ms", f"{_fmt(lat['p50'])} / {_fmt(lat['p95'])}"),
            ("feedback", f"{fb['count']} ratings, positive {_fmt(fb['positive_rate'], pct=True)}")]
    for feature, label in (("prompt_length", "drift: prompt length"), ("token_frequency", "drift: token frequency")):
        stats = drift.get(feature)
        if stats:
            rows.append((label, f"PSI {stats['psi']:.3f}  KS {stats['ks']:.3f}"))
    emb = drift.get("embedding") or {}
    if emb.get("status") == "ok":
        rows.append(("drift: embedding", f"distance {_fmt(emb['cosine_distance'])}  "
                                         f"(noise floor {_fmt(emb.get('noise_floor'))})"))
    elif emb.get("status") not in (None, "not configured"):
        rows.append(("drift: embedding", str(emb.get("detail") or emb["status"])))
    if drift.get("status") != "ok":
        rows.append(("drift", str(drift.get("status"))))
    rows.append(("suspicious clients", str(len(m.get("suspicious_clients") or []))))
    return rows


def _render(console, outcome) -> None:
    from rich.markup import escape
    from rich.table import Table

    report = outcome.report
    table = Table(title=f"monitors.{report.monitor} -> deployments.{report.deployment}", title_justify="left")
    table.add_column("check")
    table.add_column("value")
    for check, value in _rows(report.metrics):
        table.add_row(check, escape(value))
    console.print(table)
    opened = {a.key for a in report.changes.opened}
    for alert in report.alerts:
        new = " [bold](new)[/]" if alert.key in opened else ""
        console.print(f"[red bold]  ! alert:[/] [red]{escape(alert.message)}{new}[/]")
    for alert in report.changes.resolved:
        console.print(f"[green]  resolved:[/] {escape(alert.message)}")
    if not report.alerts:
        console.print("[green]  no alerts[/]")
    if report.webhook is not None:
        hook = report.webhook
        changes = f"{hook.get('changes', 0)} change{'s' if hook.get('changes', 0) != 1 else ''}"
        state = f"sent {changes}" if hook["ok"] else \
            f"failed after {hook['attempts']} attempts ({hook['error']})" if hook["attempts"] else str(hook["error"])
        console.print(f"  webhook {escape(hook['url'])}: {escape(state)}")
    elif report.spec is not None and (report.spec.webhook or report.spec.webhook_env) and report.alerts:
        console.print("  webhook: not called, nothing new since its last call")
    if outcome.html is not None:
        console.print(f"  report: {outcome.html}")


@click.group("feedback")
def feedback_group() -> None:
    """Human feedback logged by deployments (POST /v1/feedback)."""


@feedback_group.command("export")
@click.argument("name")
@click.option("--to", "to", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL file to write (a `datasets:` source can read it).")
@click.option("--min-rating", metavar="R", help="Only ratings at least this good: up, down, or 1..5 (corrected "
                                               "answers are always kept: the correction is the target).")
@click.option("--pairs", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write preference pairs (prompt, chosen, rejected) for answers rated down, as JSONL.")
@project_dir
@target_opt
def feedback_export_cmd(name: str, to: Path, min_rating: str | None, pairs: Path | None, root: Path,
                        target: str | None) -> int:
    """Write monitor NAME's rated requests as training rows (the prompt's variables as sent,
    answer = the correction or an answer rated up, rating, client) as JSONL."""
    from llmops.monitor.run import export_project_feedback

    rating: Any = int(min_rating) if min_rating and min_rating.strip().isdigit() else min_rating
    count = export_project_feedback(open_at(root, target), name, to, rating, pairs)
    click.echo(f"Exported {count} rated request{'s' if count != 1 else ''} to {to}"
               + (f"; preference pairs to {pairs}." if pairs else "."))
    return 0
