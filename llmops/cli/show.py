"""Rendering of `llmops show`."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def render_show(console: Console, rows: list[dict[str, Any]], detailed: bool) -> None:
    if not detailed:
        table = Table("address", "status", "fingerprint", box=None, header_style="bold")
        for r in rows:
            fp = (r["fingerprint"] or "-")[:19]
            style = "green" if r["status"] == "up to date" else "yellow"
            table.add_row(r["address"], f"[{style}]{escape(r['status'])}[/]", fp)
        console.print(table)
        for r in rows:
            _comparison(console, r)
        return
    r = rows[0]
    console.print(f"[bold]{r['address']}[/]  {escape(r['status'])}")
    for reason in r["reasons"]:
        console.print(f"  [dim]{escape(reason)}[/]")
    console.print(f"fingerprint: {r['fingerprint'] or '-'}")
    _comparison(console, r)
    for section in ("inputs", "outputs"):
        if r[section]:
            console.print(f"[bold]{section}[/]")
            _tree(console, r[section], 1)
    profile = r.get("profile")
    if isinstance(profile, dict):
        _profile(console, profile)


def _comparison(console: Console, row: dict[str, Any]) -> None:
    """An eval with `compare_to`: its metrics beside the other eval's, with the delta."""
    out = row.get("outputs") or {}
    compared = out.get("comparison")
    if not isinstance(compared, dict) or not isinstance(compared.get("metrics"), dict):
        return
    mine, theirs = out.get("metrics") or {}, compared["metrics"]
    this = f"{out.get('model', row['address'])}" + (f" v{out['model_version']}" if out.get("model_version") else "")
    other = f"{compared.get('model', compared.get('eval'))}" + (
        f" v{compared['model_version']}" if compared.get("model_version") else "")
    table = Table("metric", escape(this), escape(other), "delta", box=None, header_style="bold",
                  title=f"{row['address']} vs {compared.get('eval')}", title_justify="left")
    for metric, side in theirs.items():
        if not isinstance(side, dict):
            continue
        value, base, delta = mine.get(metric), side.get("value"), side.get("delta")
        table.add_row(escape(str(metric)), _num(value), _num(base),
                      f"{delta:+.4g}" if isinstance(delta, (int, float)) else "-")
    console.print(table)


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _tree(console: Console, value: Any, depth: int) -> None:
    pad = "  " * depth
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                console.print(f"{pad}{escape(str(k))}:")
                _tree(console, v, depth + 1)
            else:
                console.print(f"{pad}{escape(str(k))}: {escape(str(v))}")
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, (dict, list)):
                console.print(f"{pad}-")
                _tree(console, v, depth + 1)
            else:
                console.print(f"{pad}- {escape(str(v))}")


def _profile(console: Console, profile: dict[str, Any]) -> None:
    console.print("[bold]profile[/]")
    steps = profile.get("steps")
    if isinstance(steps, list) and steps:
        table = Table("step", "rows in", "rows out", "removed", box=None, header_style="bold")
        for s in steps:
            if isinstance(s, dict):
                rin, rout = s.get("rows_in"), s.get("rows_out")
                removed = (rin - rout) if isinstance(rin, int) and isinstance(rout, int) else ""
                if isinstance(rout, dict):
                    rout = ", ".join(f"{k} {v}" for k, v in sorted(rout.items(), key=lambda kv: kv[0] != "train"))
                table.add_row(str(s.get("step", s.get("name", "?"))), str(rin), str(rout), str(removed))
        console.print(table)
    rest = {k: v for k, v in profile.items() if k != "steps"}
    if rest:
        _tree(console, rest, 1)
