"""The plan is data: a list of ResourceChange, in the order apply will run them.

Apply builds its work from `action`, `fingerprint`, `after`, `private` and the plan's
resolved `specs` alone. `reasons` are for people and nothing branches on them; `codes`
(one per reason, see REASON_CODES) are what code may branch on. Serialising a plan lives in
`llmops.planfile`; rendering it in `llmops.plan_markdown` and the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ACTIONS = ("create", "update", "restore", "replace", "delete", "no-op")

# A reason's code, then `:` and its subject where it has one (a field path, a file, an address).
REASON_CODES = (
    "new",                  # not in llmops.lock
    "field",                # field:<path> changed in llmops.yaml
    "file-missing",         # file-missing:<path> a source file is gone
    "file-changed",         # file-changed:<path> a source file's content changed
    "file-new",             # file-new:<path> the resource reads a new file
    "content-changed",      # the provider's content fingerprint moved (model files, revision)
    "upstream-new",         # upstream-new:<address>
    "upstream-changed",     # upstream-changed:<address> its fingerprint moved
    "upstream-removed",     # upstream-removed:<address> no longer depended on
    "upstream-replaced",    # upstream-replaced:<address> rebuilt without a new fingerprint
    "drift",                # drift:<Drift.code> live state differs from the lock
    "found",                # a shared store holds the output for this fingerprint
    "forced",               # --replace
    "fingerprint-changed",  # the fingerprint moved for a reason not itemised (a newer scheme)
    "removed",              # gone from llmops.yaml
)
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
    codes: list[str] = field(default_factory=list)  # REASON_CODES, one per reason

    def because(self, code: str, reason: str) -> None:
        """Add a reason: its code for code (`REASON_CODES`, `code:subject`), its text for people."""
        if code.partition(":")[0] not in REASON_CODES:
            raise ValueError(f"unknown reason code {code!r}")
        self.codes.append(code)
        self.reasons.append(reason)

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
    # address -> resolved spec (secrets included) of every resource in llmops.yaml as planned:
    # what apply hands providers. Kept in memory only, never saved; a saved plan gets them
    # from the fresh plan `check_saved_plan` compares it with (same digests, same specs).
    specs: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)
    _depends_on: dict[str, list[str]] | None = field(default=None, init=False, repr=False, compare=False)

    def depends_on(self) -> dict[str, list[str]]:
        """address -> its upstream addresses, of every change (built once per plan)."""
        if self._depends_on is None:
            self._depends_on = {c.address: c.depends_on for c in self.changes}
        return self._depends_on

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
