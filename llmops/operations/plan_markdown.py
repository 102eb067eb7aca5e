"""A plan as one GitHub pull-request comment: summary first, details folded, bounded size."""

from __future__ import annotations

from typing import Any

from llmops.engine.plan import Plan, ResourceChange

MAX_CHARS = 60_000
MARKER = "<!-- llmops-plan -->"
_ICON = {"create": "🟢 create", "update": "🟡 update", "restore": "🔵 restore", "replace": "🟣 replace",
         "delete": "🔴 delete", "no-op": "no-op"}


def _cell(text: str, limit: int = 200) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _num(value: Any, signed: bool = False) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "—"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def _metric_rows(c: ResourceChange) -> list[str]:
    """An eval's last applied metrics against the thresholds in this change."""
    table: dict[str, Any] = (c.details or {}).get("metrics") or {}
    if not table:
        return []
    rerun = c.action in ("create", "replace")
    other = (c.details or {}).get("compared_to")
    if other:
        rows = [f"| metric | last applied | `{other}` | delta | threshold | last value passes? |",
                "|---|---:|---:|---:|---|---|"]
    else:
        rows = ["| metric | last applied | threshold | last value passes? |", "|---|---:|---|---|"]
    for metric, row in table.items():
        value = _num(row.get("last"))
        passes = {True: "✅", False: "❌"}.get(row.get("passes"), "")
        side = f" {_num(row.get('compared'))} | {_num(row.get('delta'), signed=True)} |" if other else ""
        rows.append(f"| {metric} | {value} |{side} {row.get('threshold', '')} | {passes} |")
    if rerun:
        rows.append("")
        rows.append("_The model changed: these are the last applied values; apply runs the eval again._")
    return rows


def plan_to_markdown(plan: Plan, project_name: str = "", limit: int = MAX_CHARS) -> str:
    title = f"## llmops plan{': ' + project_name if project_name else ''}"
    head = [MARKER, title, ""]
    if plan.alerts:
        head += ["> [!WARNING]", "> Open monitoring alerts:"]
        head += [f"> - `{addr}`: {_cell(alert, 300)}" for addr, alert in plan.alerts]
        head.append("")
    if not plan.has_changes:
        return "\n".join(head + ["**No changes.** llmops.yaml, llmops.lock and live state agree.", ""])
    head += [f"**{plan.summary_line()}**", ""]
    total = plan.cost()
    if total:
        from llmops.engine.cost import describe_total

        head += [describe_total(total), ""]
    head += ["| resource | action | why |", "|---|---|---|"]
    changes = [c for c in plan.changes if c.action != "no-op"]
    for c in changes:
        why = "; ".join(c.reasons[:3]) + (f" (+{len(c.reasons) - 3} more)" if len(c.reasons) > 3 else "")
        head.append(f"| `{c.address}` | {_ICON[c.action]} | {_cell(why)} |")
    head.append("")
    out = "\n".join(head)
    footer = "\n</details>\n"
    details = ["<details><summary>Details</summary>", ""]
    omitted = 0
    for i, c in enumerate(changes):
        block = [f"#### `{c.address}`: {c.action}", ""]
        block += [f"- {_cell(r, 500)}" for r in c.reasons]
        cost = (c.details or {}).get("cost")
        if isinstance(cost, dict) and c.action in ("create", "replace"):
            from llmops.engine.cost import describe

            block.append(f"- cost: {_cell(describe(cost), 500)}")
        metrics = _metric_rows(c)
        if metrics:
            block += ["", *metrics]
        block.append("")
        text = "\n".join(block) + "\n"
        if len(out) + len("\n".join(details)) + len(text) + len(footer) + 200 > limit:
            omitted = len(changes) - i
            break
        details.append(text)
    if omitted:
        details.append(f"_{omitted} more changes not shown (comment size limit); run `llmops plan` for all._\n")
    text = out + "\n".join(details) + footer
    return text[:limit]
