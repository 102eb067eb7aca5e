"""The provider contract: one provider per resource kind plans and applies that kind.

This module is the whole contract; the engine calls nothing a provider declares elsewhere
(tests/test_provider_contract.py checks every registered provider against it).

The core compares fingerprints, orders work and schedules it; a provider only knows its
own kind. What it needs of other resources it reads through the context
(`ProviderContext.spec_of`, at plan time) or the request (`ApplyRequest.upstream_specs` and
`upstream`, at apply time), never from llmops.yaml or llmops.lock on disk. Providers never
print and never import click: they report through `ApplyRequest.log` and `progress` (or
`ProviderContext.log` outside an apply). Code branches on `Drift.code` and the plan's
`ResourceChange.codes`; reason texts are for people.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from llmops.engine.lockfile import LockedResource


def _no_log(address: str, message: str) -> None:
    pass


def short_number(value: Any) -> str:
    """A metric as one-line summaries show it: 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


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
    # The lock entry of any resource as the engine holds it now (successes of this apply
    # included), None when it has none: for work outside an apply request (delete, a resource
    # that stopped being an upstream). Providers never read llmops.lock from disk.
    locked: Callable[[str], LockedResource | None] = lambda address: None

    def path(self, rel: str) -> Path:
        """A project-relative path made absolute."""
        return (self.root / rel).resolve()

    def spec_of(self, address: str) -> dict[str, Any]:
        """The resolved spec of another resource (`kind.name`), {} when llmops.yaml has none:
        what plan-time methods read of the resources theirs depends on."""
        kind, _, name = str(address).partition(".")
        spec = (self.config.get(kind) or {}).get(name) if isinstance(self.config.get(kind), dict) else None
        return spec if isinstance(spec, dict) else {}

    def specs_of(self, kind: str) -> dict[str, dict[str, Any]]:
        """name -> resolved spec of every resource of `kind` in llmops.yaml (for files one
        kind writes whole, such as dvc.yaml's stages)."""
        specs = self.config.get(kind)
        return {n: s for n, s in specs.items() if isinstance(s, dict)} if isinstance(specs, dict) else {}

    @property
    def project_name(self) -> str:
        """llmops.yaml's `project:` (MLflow experiment names derive from it)."""
        return str(self.config.get("project") or "llmops")


DRIFT_CODES = frozenset({
    "missing",      # the recorded output is gone here (a folder, a registry version, a run)
    "changed",      # the live resource exists but differs from the lock (an alias moved, files edited)
    "not-serving",  # a deployment's endpoint is down or answered by another server
    "request-log",  # a deployment's server logs requests other than its monitor in llmops.yaml asks
    "unreadable",   # the live store could not be read for this resource
})


@dataclass(frozen=True)
class Drift:
    """Live state differs from the lock: `reason` is for people, `code` (one of DRIFT_CODES)
    for code, `action` is what fixes it.

    `restore` means the locked output is missing here but a shared store holds exactly that
    content: apply fetches it and verifies its hash (`Provider.restore`); nothing downstream
    is rebuilt for it. A provider says `replace` only when no store holds it, and says why.
    """

    reason: str
    action: str = "replace"  # "update", "restore" or "replace"
    code: str = "changed"

    def __post_init__(self) -> None:
        if self.code not in DRIFT_CODES:
            raise ValueError(f"Drift code {self.code!r} is not one of {sorted(DRIFT_CODES)}")
        if self.action not in ("update", "restore", "replace"):
            raise ValueError(f"Drift action {self.action!r} is not update, restore or replace")


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

    `spec` is the resource's resolved spec as planned. `upstream` maps each direct upstream
    address to its lock entry *as just applied* (their `outputs` are final); `upstream_specs`
    maps every resource it depends on, directly or not, to its resolved spec. `before` is this
    resource's previous lock entry, if any. `private` holds `{"found": Found.private}` when the
    plan found the output in a shared store. `log(message)` reports a line under the address.
    """

    address: str
    name: str
    spec: dict[str, Any]
    action: str
    fingerprint: str
    before: LockedResource | None
    upstream: dict[str, LockedResource]
    private: dict[str, Any] = field(default_factory=dict)
    upstream_specs: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    log: Callable[[str], None] = lambda message: None
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
      heavy_modules: imported by `warm_up` (one thread) before the kind's changes start.
    """

    kind: ClassVar[str]
    in_place_fields: ClassVar[frozenset[str]] = frozenset()
    upstream_change: ClassVar[str] = "replace"
    # Imported by one thread, the warm-up's, before this kind's changes start: concurrent
    # first imports of torch/transformers/mlflow from several threads are not safe.
    heavy_modules: ClassVar[tuple[str, ...]] = ()

    def warm_up(self) -> None:
        """Before the kind's first change of an apply: heavy imports, then `preflight`."""
        import importlib

        for module in self.heavy_modules:
            importlib.import_module(module)
        self.preflight()

    def preflight(self) -> None:
        """Once per apply, before this kind's first change: check (and, where the store makes
        its own schema, prepare) the stores the kind writes to, so a misconfigured store fails
        before any work, with its fix. Raise LlmopsError subclasses."""

    def check_live(self) -> None:
        """Once per plan with refresh, before any `refresh`: fail in seconds, naming the store,
        when live state cannot be read at all (an unreachable tracking server), rather than
        hang in client retries or report every resource as drifted."""

    def __init__(self, ctx: ProviderContext) -> None:
        self.ctx = ctx

    def file_inputs(self, name: str, spec: dict[str, Any]) -> list[str]:
        """Project-relative files whose *content* is part of the fingerprint."""
        return []

    def content_fingerprint(self, name: str, spec: dict[str, Any]) -> str | None:
        """A digest of content the spec names but the project does not hold (a model's files
        in a cache, a resolved revision), part of the fingerprint; None when there is none."""
        return None

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

    def describe(self, name: str, spec: dict[str, Any], locked: LockedResource | None) -> dict[str, Any]:
        """Extra facts shown by plan (e.g. number of sweep trials); JSON-serialisable."""
        return {}

    def estimate(self, name: str, spec: dict[str, Any], locked: LockedResource | None,
                 upstream: dict[str, LockedResource | None]) -> dict[str, Any] | None:
        """What creating or replacing the resource will cost (`llmops.cost`: tokens, wall_s,
        gpu_hours, basis), scaled from its last recorded run; None for kinds that cost nothing
        worth showing. `upstream` maps each upstream address to its lock entry as it is now."""
        return None

    @classmethod
    def summary(cls, outputs: dict[str, Any]) -> str:
        """What a successful apply produced, in one line from its lock `outputs` (what a CI
        log reader wants to see after the address); "" for nothing worth a line."""
        return ""

    @abstractmethod
    def apply(self, request: ApplyRequest) -> ApplyResult:
        """Create, update or replace the resource; raise ProviderError on failure."""

    def delete(self, name: str, locked: LockedResource) -> None:
        """Remove what the resource created (the lock entry is removed by the core)."""
