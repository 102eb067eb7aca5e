"""Every real provider keeps to the one contract declared in llmops/providers/base.py.

Static: the registry covers every kind of the schema; a provider defines no public name the
base does not declare, overrides keep the base's signatures, its class attributes are valid,
and its module reads neither llmops.yaml nor llmops.lock itself (what it needs of other
resources comes through `ProviderContext.spec_of`/`specs_of` or the `ApplyRequest`).
Dynamic: on the example project, each provider's plan-time methods answer in the contract's
types for each of its resources, and refresh of a lock entry with no outputs gives `Drift`s.
"""

from __future__ import annotations

import ast
import inspect
import json
import shutil
from pathlib import Path

import pytest

from llmops.config.schema import KIND_DEFS, kind_fields, load_schema
from llmops.providers import provider_class
from llmops.providers.base import DRIFT_CODES, Drift, Provider

REPO = Path(__file__).resolve().parents[1]
KINDS = list(KIND_DEFS)
CONTRACT = {name for name in dir(Provider) if not name.startswith("_")} | {"kind"}


def _classes() -> list[tuple[str, type[Provider]]]:
    return [(kind, provider_class(kind)) for kind in KINDS]


def test_the_registry_has_a_provider_for_every_kind_the_schema_declares():
    schema_kinds = {k for k in load_schema()["properties"] if k not in ("version", "project", "settings", "targets")}
    assert schema_kinds == set(KINDS)
    for kind, cls in _classes():
        assert cls is not None, f"no provider registered for {kind}"
        assert issubclass(cls, Provider) and cls.kind == kind
        assert not inspect.isabstract(cls), f"{cls.__name__} leaves abstract methods: {cls.__abstractmethods__}"


@pytest.mark.parametrize("kind", KINDS)
def test_a_provider_defines_no_public_name_outside_the_contract(kind):
    cls = provider_class(kind)
    extra = sorted(n for n in dir(cls) if not n.startswith("_") and n not in CONTRACT)
    assert not extra, (f"{cls.__name__} adds public names the engine does not know: {extra}; declare them in "
                       "providers/base.py (the contract) or make them private helpers")


@pytest.mark.parametrize("kind", KINDS)
def test_overrides_keep_the_contracts_signatures(kind):
    cls = provider_class(kind)
    for name in sorted(CONTRACT - {"kind"}):
        base, mine = getattr(Provider, name), getattr(cls, name)
        if not callable(base) or mine is base:
            continue
        want = [(p.name, p.kind) for p in inspect.signature(base).parameters.values()]
        got = [(p.name, p.kind) for p in inspect.signature(mine).parameters.values()]
        assert got == want, f"{cls.__name__}.{name}{inspect.signature(mine)} differs from the contract's {want}"
        assert isinstance(inspect.getattr_static(cls, name), classmethod) == isinstance(
            inspect.getattr_static(Provider, name), classmethod), f"{cls.__name__}.{name}: classmethod or not, as base"


@pytest.mark.parametrize("kind", KINDS)
def test_class_attributes_are_valid(kind):
    cls = provider_class(kind)
    fields = kind_fields(kind)
    assert isinstance(cls.in_place_fields, frozenset) and cls.in_place_fields <= fields, (
        f"{cls.__name__}.in_place_fields names fields the schema lacks: {sorted(cls.in_place_fields - fields)}")
    assert cls.upstream_change in ("update", "replace")
    assert all(isinstance(m, str) for m in cls.heavy_modules)


@pytest.mark.parametrize("kind", KINDS)
def test_a_provider_module_reads_no_config_or_lock_file_of_its_own(kind):
    cls = provider_class(kind)
    tree = ast.parse(Path(inspect.getsourcefile(cls)).read_text(encoding="utf-8"))
    found = []
    # The one reader of the whole document: a promotion's approval compares all of llmops.yaml
    # being applied with the approved commit's (llmops.gitops.promotion.PromotionRequest).
    whole = {id(arg) for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "PromotionRequest" for arg in node.args}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "config" and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "ctx" and id(node) not in whole:
            found.append(f"line {node.lineno}: ctx.config (use ctx.spec_of/specs_of or request.upstream_specs)")
        if isinstance(node, ast.ImportFrom) and node.module in ("llmops.engine.lockfile", "llmops.config.validate",
                                                                "llmops.config.document"):
            names = {a.name for a in node.names}
            if names & {"load_lock", "lock_path", "load_config", "read_config", "parse_document"}:
                found.append(f"line {node.lineno}: imports {sorted(names)} from {node.module}")
    assert not found, f"{cls.__module__} reads project files the engine hands it:\n" + "\n".join(found)


# --- dynamic: the example project -------------------------------------------------------

@pytest.fixture(scope="module")
def example(tmp_path_factory):
    from llmops.engine.project import open_project

    root = tmp_path_factory.mktemp("contract") / "proj"
    shutil.copytree(REPO / "example-project", root, ignore=shutil.ignore_patterns(".llmops", "llmops.lock"))
    with (root / "llmops.yaml").open("a", encoding="utf-8") as f:  # the example has every kind but monitors
        f.write("\nmonitors:\n  support-prod:\n    drift: {psi_max: 0.5, window: 40}\n")
    return open_project(root)


@pytest.mark.parametrize("kind", KINDS)
def test_plan_time_methods_answer_in_the_contracts_types(example, kind):
    from llmops.engine.lockfile import LockedResource

    provider = example.provider(kind)
    resources = [r for r in example.config.resources.values() if r.kind == kind]
    assert resources, f"the example project has no {kind}: the conformance test needs one"
    for res in resources:
        files = provider.file_inputs(res.name, res.spec)
        assert isinstance(files, list) and all(isinstance(f, str) and not Path(f).is_absolute()
                                               and ".." not in Path(f).parts for f in files), files
        content = provider.content_fingerprint(res.name, res.spec)
        assert content is None or isinstance(content, str)
        json.dumps(provider.describe(res.name, res.spec, None))
        upstream = {u: None for u in example.config.deps.get(res.address, [])}
        cost = provider.estimate(res.name, res.spec, None, upstream)
        assert cost is None or isinstance(json.loads(json.dumps(cost)), dict)
        assert isinstance(type(provider).summary({}), str)
        empty = LockedResource(address=res.address, fingerprint="sha256:0", spec={}, files={}, upstreams={},
                               inputs={}, outputs={})
        drifts = provider.refresh(res.name, res.spec, empty)
        assert isinstance(drifts, list) and all(isinstance(d, Drift) and d.code in DRIFT_CODES for d in drifts)
        assert provider.find_existing(res.name, res.spec, "sha256:" + "0" * 64) is None
    provider.plan_done()


def test_a_drift_code_outside_the_contract_is_refused():
    assert Drift("model folder gone", code="missing").code == "missing"
    with pytest.raises(ValueError, match="not one of"):
        Drift("gone", code="vanished")
    with pytest.raises(ValueError, match="not update, restore or replace"):
        Drift("gone", action="rebuild")
