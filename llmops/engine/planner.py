"""make_plan: compare llmops.yaml (desired) with llmops.lock (recorded) and live state.

The core decides actions from fingerprints; providers contribute file inputs, content
fingerprints, in-place-updatable fields and live drift.
"""

from __future__ import annotations

import difflib
import hashlib
from typing import Any, Iterable

from llmops.engine.addrs import address_sort_key
from llmops.errors import LlmopsError, PlanError, StalePlanError
from llmops.engine.fingerprint import (
    LOCK_ONLY_FIELDS,
    FileHasher,
    canonical_json,
    locked_spec,
)
from llmops.engine.graph import Graph
from llmops.engine.plan import Plan, ResourceChange
from llmops.engine.project import Project

_ACTION_RANK = {"no-op": 0, "update": 1, "restore": 2, "replace": 3}


def make_plan(
    project: Project,
    refresh: bool = True,
    select: Iterable[str] = (),
    replace: Iterable[str] = (),
) -> Plan:
    try:
        return _make_plan(project, refresh, select, replace)
    finally:  # providers keep their caches and drop this plan's bulk reads, even on an error
        for provider in list(project.providers.values()):
            if provider is not None:
                provider.plan_done()


def _make_plan(project: Project, refresh: bool, select: Iterable[str], replace: Iterable[str]) -> Plan:
    config = project.config
    graph = config.graph()
    order = graph.order()
    select = list(select)
    replace = set(replace)
    for addr in [*select, *replace]:
        if addr not in config.resources:
            _unknown_address(addr, list(config.resources))
    scope = graph.ancestors(select) if select else set(order)

    if refresh:  # also with an empty lock: find_existing asks the shared stores about creates
        held: dict[str, list] = {}
        for addr in order:
            res = config.resources[addr]
            if addr in project.lock.resources:
                held.setdefault(res.kind, []).append((res.name, res.spec, project.lock.resources[addr]))
        for kind in sorted({r.kind for r in config.resources.values()}):
            provider = project.provider(kind)
            if provider is not None:
                provider.check_live()
        for kind in sorted({r.kind for r in config.resources.values()}):
            provider = project.provider(kind)
            if provider is not None:  # refresh reads live state per kind in bulk, not per resource
                provider.begin_refresh(held.get(kind, []))
    hasher = FileHasher(project.root, project.state_dir / "cache" / "file-md5.json")
    desired_fp: dict[str, str] = {}
    planned: dict[str, ResourceChange] = {}
    live: list[str] = []
    changes: list[ResourceChange] = []
    all_files: dict[str, str] = {}

    for addr in order:
        res = config.resources[addr]
        provider = project.provider(res.kind)
        files = {rel: hasher.md5(rel) for rel in (provider.file_inputs(res.name, res.spec) if provider else [])}
        all_files.update(files)
        content = _content_fingerprint(provider, res.name, res.spec)
        ups = {u: desired_fp[u] for u in config.deps.get(addr, [])}
        spec = locked_spec(res.spec, res.kind)
        fp = _fingerprint(res.kind, spec, files, ups, content)
        desired_fp[addr] = fp
        if addr not in scope:
            continue
        locked = project.lock.get(addr)
        after = {
            "spec": spec,
            "fingerprint": fp,
            "files": files,
            "upstreams": ups,
        }
        if content is not None:
            after["content"] = content
        change = _decide(project, provider, res.kind, res.name, res.spec, locked, after,
                         planned, refresh, live)
        found = None
        if refresh and provider and change.action in ("create", "replace") and addr not in replace:
            found = provider.find_existing(res.name, res.spec, fp)
            if found is not None:
                change.action = "restore"
                change.reasons.append(found.reason)
                live.append(f"{addr}: {found.reason}")
        _propagate_rebuilds(change, provider, planned, config.deps.get(addr, []))
        if addr in replace and change.action != "create":
            change.action = "replace"
            change.reasons.append("forced by --replace")
            change.lock_only = False
        change.depends_on = list(config.deps.get(addr, []))
        if provider and change.action != "no-op":
            change.private = provider.plan_private(res.name, res.spec, locked)
            if found is not None:
                change.private["found"] = found.private
        if provider:
            change.details = provider.describe(res.name, res.spec, locked)
            if change.action in ("create", "replace"):
                cost = provider.estimate(res.name, res.spec, locked,
                                         {u: project.lock.get(u) for u in config.deps.get(addr, [])})
                if cost:
                    change.details["cost"] = cost
            if refresh and locked is not None:
                change.alerts = provider.alerts(res.name, res.spec, locked)
        planned[addr] = change
        changes.append(change)

    if not select:
        changes = _deletions(project, graph) + changes
    hasher.save()
    return Plan(
        changes=changes,
        lock_digest=project.lock.digest(),
        config_digest=_config_digest(project, all_files),
        live_digest=hashlib.sha256("\n".join(live).encode()).hexdigest() if refresh else "",
        target=config.target,
        refresh=refresh,
        selected=sorted(select, key=address_sort_key),
    )


def _propagate_rebuilds(change: ResourceChange, provider, planned: dict[str, ResourceChange], deps: list[str]) -> None:
    """An upstream rebuilt for a reason that leaves its fingerprint alone (drift, --replace)
    still produces new outputs: what reads them must follow."""
    if change.action not in ("no-op", "update", "restore") or change.lock_only:
        return
    rebuilt = [u for u in deps if u in planned and planned[u].action == "replace"
               and f"upstream {u} changed" not in change.reasons]
    if not rebuilt:
        return
    follow = provider.upstream_change if provider else "replace"
    if _ACTION_RANK[follow] > _ACTION_RANK[change.action]:
        change.action = follow
    change.reasons.extend(f"upstream {u} will be replaced" for u in rebuilt)


def _fingerprint(kind: str, spec: dict[str, Any], files: dict[str, str], upstreams: dict[str, str],
                 content: str | None) -> str:
    """`llmops.engine.fingerprint.fingerprint` of a resource whose `locked_spec` is `spec`: the same
    hash (tests/test_plan_cache.py checks), without normalising the spec a second time (that
    is most of a plan's time at 10,000 resources)."""
    payload = {
        "kind": kind,
        "spec": {k: v for k, v in spec.items() if k not in LOCK_ONLY_FIELDS},
        "files": files,
        "upstreams": upstreams,
        "content": content,
    }
    return "sha256:" + hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def _content_fingerprint(provider, name: str, spec: dict) -> str | None:
    fn = getattr(provider, "content_fingerprint", None)
    return fn(name, spec) if fn else None


def _decide(project, provider, kind, name, spec, locked, after, planned, refresh, live) -> ResourceChange:
    addr = f"{kind}.{name}"
    if locked is None:
        return ResourceChange(addr, "create", ["new resource (not in llmops.lock)"], None, after)
    before = locked.to_dict()
    reasons: list[str] = []
    changed_fields = _field_diffs(locked.spec, after["spec"], reasons, kind)
    files_changed = _file_diffs(locked.files, after["files"], reasons)
    if after.get("content") is not None and locked.inputs.get("content") not in (None, after["content"]):
        reasons.append("content changed (model files or resolved revision)")
        files_changed = True
    upstream_changed = []
    for u, fp in after["upstreams"].items():
        if locked.upstreams.get(u) != fp:
            upstream_changed.append(u)
            up = planned.get(u)
            verb = "is new" if up is None or up.action == "create" or u not in locked.upstreams else "changed"
            reasons.append(f"upstream {u} {verb}")
    for u in locked.upstreams:
        if u not in after["upstreams"]:
            reasons.append(f"no longer depends on {u}")
            upstream_changed.append(u)

    fp_fields = {f for f in changed_fields if f not in LOCK_ONLY_FIELDS}
    if after["fingerprint"] == locked.fingerprint and not fp_fields:
        action = "no-op"
        if changed_fields:  # only lock-recorded fields such as `protect`
            return ResourceChange(addr, "update", reasons, before, after, lock_only=True)
        if refresh and provider is not None:
            for drift in provider.refresh(name, spec, locked):
                live.append(f"{addr}: {drift.reason}")
                reasons.append(f"drift: {drift.reason}")
                if _ACTION_RANK[drift.action] > _ACTION_RANK[action]:
                    action = drift.action
        return ResourceChange(addr, action, reasons, before, after)

    in_place = provider.in_place_fields if provider else frozenset()
    upstream_action = provider.upstream_change if provider else "replace"
    if files_changed or (fp_fields - in_place):
        action = "replace"
    elif fp_fields:
        action = "update" if not upstream_changed or upstream_action == "update" else "replace"
    elif upstream_changed:
        action = upstream_action
    else:  # fingerprint moved for a reason not itemised above (e.g. a newer fingerprint scheme)
        action = "replace"
        reasons.append("fingerprint changed")
    return ResourceChange(addr, action, reasons, before, after)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _fmt(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, str):
        return value
    text = canonical_json(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _field_diffs(old: dict, new: dict, reasons: list[str], kind: str = "") -> set[str]:
    """Add `path: old -> new` reasons; return the changed top-level fields. A side left out
    shows its documented default (`0.0002 (default)`): specs are compared without them."""
    from llmops.config.schema import defaults_by_path

    if canonical_json(old) == canonical_json(new):  # the usual case, in one comparison
        return set()
    a, b = _flatten(old), _flatten(new)
    defaults = defaults_by_path(kind) if kind else {}

    def side(values: dict[str, Any], path: str) -> str:
        if path in values:
            return _fmt(values[path])
        default = defaults.get(".".join("0" if part.isdigit() else part for part in path.split(".")))
        return _fmt(None) if default is None else f"{_fmt(default)} (default)"

    top: set[str] = set()
    for path in sorted(set(a) | set(b)):
        if path in a and path in b and canonical_json(a[path]) == canonical_json(b[path]):
            continue
        reasons.append(f"{path}: {side(a, path)} -> {side(b, path)}")
        top.add(path.split(".")[0])
    return top


def _file_diffs(old: dict, new: dict, reasons: list[str]) -> bool:
    changed = False
    for rel, md5 in new.items():
        if old.get(rel) != md5:
            changed = True
            if md5 == "missing":
                reasons.append(f"source file missing: {rel}")
            elif rel in old:
                reasons.append(f"source content changed ({rel})")
            else:
                reasons.append(f"reads a new file ({rel})")
    return changed


def _deletions(project: Project, graph: Graph) -> list[ResourceChange]:
    gone = [a for a in project.lock.resources if a not in project.config.resources]
    if not gone:
        return []
    protected = [a for a in gone if project.lock.resources[a].spec.get("protect")]
    if protected:
        raise PlanError(
            "this plan would delete protected resources: " + ", ".join(sorted(protected, key=address_sort_key))
            + ". Put them back in llmops.yaml, or first set `protect: false` on them and apply, then remove them."
        )
    # Delete dependents before what they depend on (reverse of the recorded order).
    recorded = Graph({a: [u for u in project.lock.resources[a].upstreams if u in gone] for a in gone})
    order = list(reversed(recorded.order()))
    return [
        ResourceChange(a, "delete", ["removed from llmops.yaml"], project.lock.resources[a].to_dict(), None,
                       depends_on=[])
        for a in order
    ]


def _config_digest(project: Project, files: dict[str, str]) -> str:
    """Digest of everything desired state is made of: config text, target, input files."""
    h = hashlib.sha256()
    h.update(project.config.doc.text.encode())
    h.update(f"\0target={project.config.target}\0".encode())
    for rel in sorted(files):
        h.update(f"{rel}={files[rel]}\0".encode())
    return h.hexdigest()


def _unknown_address(addr: str, known: list[str]) -> None:
    close = difflib.get_close_matches(addr, known, n=1)
    hint = f" Did you mean {close[0]}?" if close else " Run `llmops show` to list addresses."
    raise LlmopsError(f"unknown resource address '{addr}'.{hint}")


def check_saved_plan(project: Project, saved: Plan) -> None:
    """Refuse a saved plan when the lock, config or live state moved since it was made."""
    if saved.target != project.config.target:
        raise StalePlanError(f"the saved plan was made for target {saved.target!r}, not {project.config.target!r}; "
                             "run `llmops plan` again with the same --target.")
    # The same plan made now carries the digests to compare (one pass over the inputs).
    fresh = make_plan(project, refresh=saved.refresh, select=saved.selected)
    if saved.lock_digest != fresh.lock_digest:
        raise StalePlanError("saved plan is stale: llmops.lock changed since it was made; run `llmops plan` again.")
    if saved.config_digest != fresh.config_digest:
        raise StalePlanError("saved plan is stale: llmops.yaml or a file it reads changed since it was made; "
                             "run `llmops plan` again.")
    if saved.refresh and fresh.live_digest != saved.live_digest:
        raise StalePlanError("saved plan is stale: live state (registry, outputs on disk, endpoints) changed "
                             "since it was made; run `llmops plan` again.")
