"""The provider interface: one provider per resource kind plans and applies that kind.

The core compares fingerprints, orders work and schedules it; a provider only knows its
own kind. Providers never print and never import click: they report through
`ProviderContext.log` and the `progress` callback of an `ApplyRequest`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from llmops.engine.lockfile import LockedResource


def _no_log(address: str, message: str) -> None:
    pass


@dataclass
class ProviderContext:
    """What every provider may read about the project it works in.

    `root` is the project folder (holding llmops.yaml); `state_dir` is `root/.llmops`,
    where providers keep private state (MLflow DB, reports, runtime files).
    `settings` are the resolved `settings:` (target overlay applied, defaults filled in).
    `config` is the whole resolved llmops.yaml document (read-only); `target` the overlay used.
    """

    root: Path
    state_dir: Path
    settings: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str, str], None] = _no_log
    target: str | None = None  # the --target overlay in use
    options: dict[str, Any] = field(default_factory=dict)  # run options, e.g. approved_by

    def path(self, rel: str) -> Path:
        """A project-relative path made absolute."""
        return (self.root / rel).resolve()


@dataclass(frozen=True)
class Drift:
    """Live state differs from the lock: `reason` is for people, `action` is what fixes it.

    `restore` means the locked output is missing here but a shared store holds exactly that
    content: apply fetches it and verifies its hash (`Provider.restore`); nothing downstream
    is rebuilt for it. A provider says `replace` only when no store holds it, and says why.
    """

    reason: str
    action: str = "replace"  # "update", "restore" or "replace"


@dataclass(frozen=True)
class Found:
    """A shared store already holds the output made for exactly this fingerprint (say, the
    version a pull request's CI job trained): the plan restores it instead of rebuilding.

    `reason` is for people; `private` reaches `Provider.restore` as `request.private["found"]`.
    """

    reason: str
    private: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProgressEvent:
    """A step of a long-running apply (training steps, rows processed...)."""

    completed: float | None = None
    total: float | None = None
    message: str = ""


@dataclass
class ApplyRequest:
    """One resource to create, update or replace.

    `upstream` maps each upstream address to its lock entry *as just applied* (their
    `outputs` are final). `before` is this resource's previous lock entry, if any.
    `private` is what `Provider.plan_private` handed over at plan time.
    """

    address: str
    name: str
    spec: dict[str, Any]
    action: str
    fingerprint: str
    before: LockedResource | None
    upstream: dict[str, LockedResource]
    private: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[ProgressEvent], None] = lambda event: None
    cancelled: Callable[[], bool] = lambda: False


@dataclass
class ApplyResult:
    """What a successful apply records in the lock: resolved inputs and outputs.

    Both must be JSON-serialisable and contain no secrets.
    """

    outputs: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)


class Provider(ABC):
    """Plans and applies one resource kind.

    Class attributes:
      kind: the top-level key in llmops.yaml (e.g. "datasets").
      in_place_fields: top-level spec keys whose change alone is an `update` rather than
        a `replace` (e.g. an eval's `thresholds`, a deployment's `alias`).
      upstream_change: the action planned when only an upstream changed.
      heavy_modules: imported by `warm_up` in the main thread before apply's threads start.
    """

    kind: ClassVar[str]
    in_place_fields: ClassVar[frozenset[str]] = frozenset()
    upstream_change: ClassVar[str] = "replace"
    # Libraries apply imports in the main thread before it starts worker threads: concurrent
    # first imports of torch/transformers/mlflow from several threads are not safe.
    heavy_modules: ClassVar[tuple[str, ...]] = ()
    uses_tracking: ClassVar[bool] = False  # opens the MLflow store: checked once before apply

    def warm_up(self) -> None:
        import importlib

        for module in self.heavy_modules:
            importlib.import_module(module)
        if self.uses_tracking:
            from llmops.integrations.mlflow import check_store

            check_store(self.ctx.root, self.ctx.settings)

    def check_live(self) -> None:
        """Once per plan with refresh, before any `refresh`: fail in seconds, naming the store,
        when live state cannot be read at all (an unreachable tracking server), rather than
        hang in client retries or report every resource as drifted."""
        if self.uses_tracking:
            from llmops.integrations.mlflow import check_reachable, registry_uri, tracking_uri

            check_reachable(tracking_uri(self.ctx.root, self.ctx.settings))
            check_reachable(registry_uri(self.ctx.root, self.ctx.settings))

    def __init__(self, ctx: ProviderContext) -> None:
        self.ctx = ctx

    def file_inputs(self, name: str, spec: dict[str, Any]) -> list[str]:
        """Project-relative files whose *content* is part of the fingerprint."""
        return []

    def refresh(self, name: str, spec: dict[str, Any], locked: LockedResource) -> list[Drift]:
        """Read live state; return how it differs from the lock (empty: in sync)."""
        return []

    def begin_refresh(self, entries: list[tuple[str, dict[str, Any], LockedResource]]) -> None:
        """Once per plan with refresh, after `check_live` and before any `refresh`: (name, spec,
        lock entry) of every resource of this kind the lock holds. What `refresh` needs from a
        store is then read for all of them at once, on first use (`bulk`), not once per resource.
        The base keeps them in `refreshing`; a provider may also start work here (probes) and
        keep what it found in `_bulk_values`."""
        self.refreshing = list(entries)
        self._bulk_values = {}

    # What begin_refresh was given; `_bulk_values` is None outside a plan's refresh, so a
    # refresh called on its own never answers from a bulk read of an earlier plan.
    refreshing: list[tuple[str, dict[str, Any], LockedResource]] = []
    _bulk_values: dict[Any, Any] | None = None

    def bulk(self, key: Any, fetch: Callable[[], Any]) -> Any:
        """`fetch()` once per plan's refresh (per `key`): live state read in bulk for every
        resource in `refreshing`. Outside a refresh, `fetch()` every time (nothing is kept).

        The contract of a bulk read: it may only show a resource *in sync*. Whatever it does
        not show as in sync, or a None (the store could not answer the bulk query), `refresh`
        asks about one resource at a time with its exact checks and messages, so the drift
        found, and its wording, is the same as without bulk reads."""
        values = self._bulk_values
        if values is None:
            return fetch()
        if key not in values:
            values[key] = fetch()
        return values[key]

    def plan_done(self) -> None:
        """Once at the end of every plan: keep what the provider cached (see `llmops.digestcache`)
        and forget what it read in bulk for this plan (the next plan reads live state again)."""
        self.refreshing = []
        self._bulk_values = None

    def alerts(self, name: str, spec: dict[str, Any], locked: LockedResource) -> list[str]:
        """Open alerts about the live resource (e.g. monitoring drift), shown by plan with refresh."""
        return []

    def find_existing(self, name: str, spec: dict[str, Any], fingerprint: str) -> Found | None:
        """With refresh, for a resource the lock does not hold at this fingerprint: does a shared
        store already hold its output (made by another checkout)? Called only where the
        fingerprint itself changed, never for a forced rebuild (--replace, a rebuilt upstream)."""
        return None

    def restore(self, request: ApplyRequest) -> ApplyResult:
        """Fetch a `restore` change's output from the shared store and verify its hash.

        `request.before` is the lock entry when the drift was a missing output;
        `request.private["found"]` is `Found.private` when the output was found by fingerprint.
        Raise ProviderError (naming the store and the fix) when the store no longer has it.
        """
        from llmops.errors import ProviderError

        raise ProviderError(f"{request.address}: this kind cannot restore outputs from a shared store; "
                            f"run `llmops apply --replace {request.address}` to rebuild it.")

    def plan_private(self, name: str, spec: dict[str, Any], locked: LockedResource | None) -> dict[str, Any]:
        """Data handed from plan to apply (Terraform's `Private`); JSON-serialisable."""
        return {}

    def describe(self, name: str, spec: dict[str, Any], locked: LockedResource | None) -> dict[str, Any]:
        """Extra facts shown by plan (e.g. number of sweep trials); JSON-serialisable."""
        return {}

    def estimate(self, name: str, spec: dict[str, Any], locked: LockedResource | None,
                 upstream: dict[str, LockedResource | None]) -> dict[str, Any] | None:
        """What creating or replacing the resource will cost (`llmops.cost`: tokens, wall_s,
        gpu_hours, basis), scaled from its last recorded run; None for kinds that cost nothing
        worth showing. `upstream` maps each upstream address to its lock entry as it is now."""
        return None

    @abstractmethod
    def apply(self, request: ApplyRequest) -> ApplyResult:
        """Create, update or replace the resource; raise ProviderError on failure."""

    def delete(self, name: str, locked: LockedResource) -> None:
        """Remove what the resource created (the lock entry is removed by the core)."""
