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
from llmops.engine.fingerprint import LOCK_ONLY_FIELDS, FileHasher, locked_spec
from llmops.hashing import canonical_json, sha256_json
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
        content = provider.content_fingerprint(res.name, res.spec) if provider else None
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
                change.because("found", found.reason)
                live.append(f"{addr}: {found.reason}")
        _propagate_rebuilds(change, provider, planned, config.deps.get(addr, []))
        if addr in replace and change.action != "create":
            change.action = "replace"
            change.because("forced", "forced by --replace")
            change.lock_only = False
        change.depends_on = list(config.deps.get(addr, []))
        if found is not None:
            change.private = {"found": found.private}
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
        specs={addr: res.spec for addr, res in config.resources.items()},
    )


def _propagate_rebuilds(change: ResourceChange, provider, planned: dict[str, ResourceChange], deps: list[str]) -> None:
    """An upstream rebuilt for a reason that leaves its fingerprint alone (drift, --replace)
    still produces new outputs: what reads them must follow."""
    if change.action not in ("no-op", "update", "restore") or change.lock_only:
        return
    rebuilt = [u for u in deps if u in planned and planned[u].action == "replace"
               and f"upstream-changed:{u}" not in change.codes]
    if not rebuilt:
        return
    follow = provider.upstream_change if provider else "replace"
    if _ACTION_RANK[follow] > _ACTION_RANK[change.action]:
        change.action = follow
    for u in rebuilt:
        change.because(f"upstream-replaced:{u}", f"upstream {u} will be replaced")


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
    return "sha256:" + sha256_json(payload)


def _decide(project, provider, kind, name, spec, locked, after, planned, refresh, live) -> ResourceChange:
    addr = f"{kind}.{name}"
    if locked is None:
        change = ResourceChange(addr, "create", [], None, after)
        change.because("new", "new resource (not in llmops.lock)")
        return change
    why = ResourceChange(addr, "no-op", [], locked.to_dict(), after)  # collects the reasons
    changed_fields = _field_diffs(locked.spec, after["spec"], why, kind)
    files_changed = _file_diffs(locked.files, after["files"], why)
    if after.get("content") is not None and locked.inputs.get("content") not in (None, after["content"]):
        why.because("content-changed", "content changed (model files or resolved revision)")
        files_changed = True
    upstream_changed = []
    for u, fp in after["upstreams"].items():
        if locked.upstreams.get(u) != fp:
            upstream_changed.append(u)
            up = planned.get(u)
            new = up is None or up.action == "create" or u not in locked.upstreams
            why.because(f"upstream-new:{u}" if new else f"upstream-changed:{u}",
                        f"upstream {u} {'is new' if new else 'changed'}")
    for u in locked.upstreams:
        if u not in after["upstreams"]:
            why.because(f"upstream-removed:{u}", f"no longer depends on {u}")
            upstream_changed.append(u)

    fp_fields = {f for f in changed_fields if f not in LOCK_ONLY_FIELDS}
    if after["fingerprint"] == locked.fingerprint and not fp_fields:
        if changed_fields:  # only lock-recorded fields such as `protect`
            why.action, why.lock_only = "update", True
            return why
        if refresh and provider is not None:
            for drift in provider.refresh(name, spec, locked):
                live.append(f"{addr}: {drift.reason}")
                why.because(f"drift:{drift.code}", f"drift: {drift.reason}")
                if _ACTION_RANK[drift.action] > _ACTION_RANK[why.action]:
                    why.action = drift.action
        return why

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
        why.because("fingerprint-changed", "fingerprint changed")
    why.action = action
    return why


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not prefix and value == {}:  # a spec left with nothing but defaults: no fields, not one field ""
        return {}
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


def _field_diffs(old: dict, new: dict, why: ResourceChange, kind: str = "") -> set[str]:
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
        why.because(f"field:{path}", f"{path}: {side(a, path)} -> {side(b, path)}")
        top.add(path.split(".")[0])
    return top


def _file_diffs(old: dict, new: dict, why: ResourceChange) -> bool:
    changed = False
    for rel, md5 in new.items():
        if old.get(rel) != md5:
            changed = True
            if md5 == "missing":
                why.because(f"file-missing:{rel}", f"source file missing: {rel}")
            elif rel in old:
                why.because(f"file-changed:{rel}", f"source content changed ({rel})")
            else:
                why.because(f"file-new:{rel}", f"reads a new file ({rel})")
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
                       depends_on=[], codes=["removed"])
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
    saved.specs = fresh.specs  # the same digests: the specs the saved plan was made from
