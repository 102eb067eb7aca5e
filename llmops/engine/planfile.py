"""The plan file: the one place a Plan is turned into JSON and back.

`plan --json` prints `plan_to_dict(plan)`; `plan --out FILE` saves the same document, and
`apply FILE` loads it. The format is versioned (`format_version`) and documented in
docs/plan-format.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmops import __version__
from llmops.errors import LlmopsError
from llmops.fsutil import atomic_write_text
from llmops.engine.plan import ACTIONS, Plan, ResourceChange

FORMAT_VERSION = 1


def change_to_dict(c: ResourceChange) -> dict[str, Any]:
    return {
        "address": c.address,
        "kind": c.kind,
        "name": c.name,
        "action": c.action,
        "reasons": list(c.reasons),
        "codes": list(c.codes),
        "before": c.before,
        "after": c.after,
        "depends_on": list(c.depends_on),
        "details": c.details,
        "lock_only": c.lock_only,
        "alerts": list(c.alerts),
        "private": c.private,
    }


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "llmops_version": __version__,
        "target": plan.target,
        "refresh": plan.refresh,
        "selected": plan.selected,
        "digests": {"lock": plan.lock_digest, "config": plan.config_digest, "live": plan.live_digest},
        "summary": plan.summary(),
        "has_changes": plan.has_changes,
        "cost": plan.cost(),
        "resource_changes": [change_to_dict(c) for c in plan.changes],
    }


def plan_to_json(plan: Plan) -> str:
    return json.dumps(plan_to_dict(plan), indent=2, sort_keys=False, default=str) + "\n"


def save_plan(plan: Plan, path: Path) -> None:
    atomic_write_text(path, plan_to_json(plan))


def load_plan(path: Path) -> Plan:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlmopsError(f"{path}: saved plan not found; run `llmops plan --out {path}` first.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise LlmopsError(f"{path}: not an llmops plan file ({exc}); run `llmops plan --out {path}` again.") from None
    if not isinstance(data, dict) or "format_version" not in data:
        raise LlmopsError(f"{path}: not an llmops plan file (no format_version).")
    if data["format_version"] != FORMAT_VERSION:
        raise LlmopsError(f"{path}: plan format {data['format_version']} is not supported by this llmops "
                          f"(reads {FORMAT_VERSION}); run `llmops plan` again with this version.")
    try:
        changes = [
            ResourceChange(
                address=c["address"], action=c["action"], reasons=list(c.get("reasons", [])),
                before=c.get("before"), after=c.get("after"), depends_on=list(c.get("depends_on", [])),
                private=c.get("private") or {}, details=c.get("details") or {},
                lock_only=bool(c.get("lock_only", False)), alerts=list(c.get("alerts", [])),
                codes=list(c.get("codes", [])),
            )
            for c in data["resource_changes"]
        ]
        digests = data.get("digests", {})
        plan = Plan(changes=changes, lock_digest=digests.get("lock", ""), config_digest=digests.get("config", ""),
                    live_digest=digests.get("live", ""), target=data.get("target"),
                    refresh=bool(data.get("refresh", True)), selected=list(data.get("selected", [])))
    except (KeyError, TypeError) as exc:
        raise LlmopsError(f"{path}: the plan file is damaged (missing {exc}); run `llmops plan` again.") from None
    if any(c.action not in ACTIONS for c in plan.changes):
        raise LlmopsError(f"{path}: the plan file holds an unknown action; run `llmops plan` again.")
    return plan
