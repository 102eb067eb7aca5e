"""Read-only views of a project: `show` rows and the dependency graph as text."""

from __future__ import annotations

import json
from typing import Any

from llmops.engine.addrs import address_sort_key
from llmops.errors import LlmopsError
from llmops.engine.project import Project
from llmops.config.validate import Config

_STATUS = {
    "no-op": "up to date",
    "create": "not applied",
    "update": "changed (update pending)",
    "restore": "missing here, held by a shared store (restore pending)",
    "replace": "changed (replace pending)",
    "delete": "removed from llmops.yaml (delete pending)",
}


def show_resources(project: Project, address: str | None = None, refresh: bool = True) -> list[dict[str, Any]]:
    """One row per resource: lock record, plan status, drift, and a report summary when present."""
    from llmops.engine.planner import make_plan

    addrs = sorted(set(project.config.resources) | set(project.lock.resources), key=address_sort_key)
    if address is not None:
        if address not in addrs:
            import difflib

            close = difflib.get_close_matches(address, addrs, n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise LlmopsError(f"no resource '{address}' in llmops.yaml or llmops.lock.{hint}")
        addrs = [address]
    plan = make_plan(project, refresh=refresh)
    rows = []
    for addr in addrs:
        change = plan.get(addr)
        locked = project.lock.get(addr)
        row: dict[str, Any] = {
            "address": addr,
            "status": _STATUS[change.action] if change else "up to date",
            "reasons": change.reasons if change else [],
            "fingerprint": locked.fingerprint if locked else None,
            "inputs": locked.inputs if locked else {},
            "outputs": locked.outputs if locked else {},
        }
        profile = (locked.outputs.get("profile") if locked else None)
        if isinstance(profile, str):
            path = project.root / profile
            if path.is_file():
                try:
                    row["profile"] = json.loads(path.read_text())
                except ValueError:
                    row["profile_error"] = f"{profile} is not valid JSON"
        rows.append(row)
    return rows


def graph_text(config: Config, fmt: str = "mermaid") -> str:
    addrs = sorted(config.resources, key=address_sort_key)
    ids = {a: f"n{i}" for i, a in enumerate(addrs)}
    lines: list[str] = []
    if fmt == "mermaid":
        lines.append("graph LR")
        for a in addrs:
            lines.append(f'  {ids[a]}["{a}"]')
        for a in addrs:
            for d in config.deps.get(a, []):
                lines.append(f"  {ids[d]} --> {ids[a]}")
    else:
        lines.append("digraph llmops {")
        lines.append("  rankdir=LR;")
        for a in addrs:
            lines.append(f'  "{a}";')
        for a in addrs:
            for d in config.deps.get(a, []):
                lines.append(f'  "{d}" -> "{a}";')
        lines.append("}")
    return "\n".join(lines) + "\n"
