"""The plan is data: a list of ResourceChange, in the order apply will run them.

Apply builds its work from `action`, `fingerprint`, `after` and `private` alone; `reasons`
are for people and nothing branches on them. Serialising a plan lives in
`llmops.planfile`; rendering it in `llmops.plan_markdown` and the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ACTIONS = ("create", "update", "restore", "replace", "delete", "no-op")
CHANGE_ACTIONS = ("create", "update", "restore", "replace", "delete")


@dataclass
class ResourceChange:
    """One resource's planned change.

    before: its lock entry (dict) or None when new.
    after: {"spec", "fingerprint", "files", "upstreams"} desired, or None for delete.
    depends_on: upstream addresses (for ordering apply).
    lock_only: only lock-recorded fields changed (e.g. `protect`); apply rewrites the lock
      entry without calling the provider.
    details: facts from the provider for display (e.g. sweep trials).
    alerts: open alerts from monitoring, shown by plan; they are not an action.
    """

    address: str
    action: str
    reasons: list[str] = field(default_factory=list)
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    depends_on: list[str] = field(default_factory=list)
    private: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    lock_only: bool = False
    alerts: list[str] = field(default_factory=list)  # open monitoring alerts (do not make a change)

    @property
    def kind(self) -> str:
        return self.address.partition(".")[0]

    @property
    def name(self) -> str:
        return self.address.partition(".")[2]


@dataclass
class Plan:
    """A whole plan, plus digests of what it was made from (to refuse stale saved plans)."""

    changes: list[ResourceChange]
    lock_digest: str = ""
    config_digest: str = ""
    live_digest: str = ""
    target: str | None = None
    refresh: bool = True
    selected: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        counts = {a: 0 for a in ACTIONS}
        for c in self.changes:
            counts[c.action] += 1
        return counts

    @property
    def alerts(self) -> list[tuple[str, str]]:
        return [(c.address, a) for c in self.changes for a in c.alerts]

    @property
    def has_changes(self) -> bool:
        return any(c.action != "no-op" for c in self.changes)

    def get(self, address: str) -> ResourceChange | None:
        for c in self.changes:
            if c.address == address:
                return c
        return None

    def cost(self) -> dict[str, Any] | None:
        """The estimated cost of every training and eval action in the plan (llmops.engine.cost.total)."""
        from llmops.engine.cost import total

        return total([c.details["cost"] for c in self.changes
                      if c.action in ("create", "replace") and isinstance((c.details or {}).get("cost"), dict)])

    def summary_line(self) -> str:
        s = self.summary()
        # `restore` is named only when there is one, so plans without shared stores read as before.
        restore = f"{s['restore']} to restore, " if s["restore"] else ""
        return (f"Plan: {s['create']} to create, {restore}{s['replace']} to replace, "
                f"{s['update']} to update, {s['delete']} to delete.")
