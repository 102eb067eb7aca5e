"""Engine behaviour on small projects with recording providers (tests/engine_providers.py)."""

from __future__ import annotations

import pytest

import engine_providers as ep
from llmops.engine.apply import ApplyHooks, apply_plan
from llmops.errors import PlanError, ProviderError, StalePlanError
from llmops.engine.lockfile import load_lock
from llmops.engine.planner import check_saved_plan, make_plan
from llmops.engine.project import open_project

CONFIG = """\
version: 1
project: eng
datasets:
  a: {source: data/a.jsonl}
  b: {source: data/b.jsonl}
prompts:
  p: {text: "Q: {{ question }}", variables: [question]}
base_models:
  m: {build: {architecture: llama, tokenizer_from: a}}
finetunes:
  f:
    base_model: m
    dataset: a
    prompt: p
    training: {learning_rate: 0.0002}
evals:
  e: {model: f, dataset: a, metrics: [exact_match], thresholds: {exact_match: ">= 0.1"}}
deployments:
  d: {model: f, gates: [e], alias: production}
"""


@pytest.fixture
def proj(project):
    ep.reset()
    project.write({"llmops.yaml": CONFIG, "data/a.jsonl": '{"question": "a"}\n', "data/b.jsonl": '{"question": "b"}\n'})
    return project


def opened(project):
    return open_project(project.root, provider_overrides=ep.OVERRIDES)


def plan_of(project, **kw):
    return make_plan(opened(project), **kw)


def actions(plan):
    return {c.address: c.action for c in plan.changes}


def apply_all(project, **kw):
    p = opened(project)
    plan = make_plan(p)
    return apply_plan(p, plan, **kw), plan


def test_first_plan_creates_everything_in_dependency_order(proj):
    plan = plan_of(proj)
    assert set(actions(plan).values()) == {"create"}
    order = [c.address for c in plan.changes]
    assert order.index("datasets.a") < order.index("base_models.m") < order.index("finetunes.f")
    assert order.index("finetunes.f") < order.index("evals.e") < order.index("deployments.d")
    assert plan.summary_line() == "Plan: 7 to create, 0 to replace, 0 to update, 0 to delete."


def test_apply_records_every_resource_then_plan_is_clean(proj):
    report, _ = apply_all(proj)
    assert report.ok and len(report.applied) == 7
    lock = load_lock(proj.path("llmops.lock"))
    assert set(lock.resources) == {"datasets.a", "datasets.b", "prompts.p", "base_models.m",
                                   "finetunes.f", "evals.e", "deployments.d"}
    assert lock.resources["finetunes.f"].outputs["upstream"] == ["base_models.m", "datasets.a", "prompts.p"]
    import hashlib

    assert lock.resources["datasets.a"].files == {
        "data/a.jsonl": hashlib.md5(b'{"question": "a"}\n').hexdigest()}
    again = plan_of(proj)
    assert not again.has_changes
    assert again.summary_line() == "Plan: 0 to create, 0 to replace, 0 to update, 0 to delete."


def test_hyperparameter_change_replaces_finetune_and_reruns_downstream(proj):
    apply_all(proj)
    proj.write({"llmops.yaml": CONFIG.replace("learning_rate: 0.0002", "learning_rate: 0.0001")})
    plan = plan_of(proj)
    acts = actions(plan)
    assert acts["finetunes.f"] == "replace"
    assert "training.learning_rate: 0.0002 (default) -> 0.0001" in plan.get("finetunes.f").reasons
    assert acts["evals.e"] == "replace"
    assert "upstream finetunes.f changed" in plan.get("evals.e").reasons
    assert acts["deployments.d"] == "update"  # deployments re-check their gates in place
    assert acts["datasets.a"] == acts["base_models.m"] == "no-op"


def test_source_file_change_plans_dataset_and_downstream(proj):
    apply_all(proj)
    proj.write({"data/a.jsonl": '{"question": "changed"}\n'})
    plan = plan_of(proj, refresh=False)
    assert plan.get("datasets.a").action == "replace"
    assert "source content changed (data/a.jsonl)" in plan.get("datasets.a").reasons
    assert actions(plan)["datasets.b"] == "no-op"
    for addr in ("base_models.m", "finetunes.f", "evals.e"):
        assert actions(plan)[addr] == "replace", addr


def test_threshold_only_change_is_an_update(proj):
    apply_all(proj)
    proj.write({"llmops.yaml": CONFIG.replace('">= 0.1"', '">= 0.2"')})
    plan = plan_of(proj)
    assert plan.get("evals.e").action == "update"
    assert plan.get("finetunes.f").action == "no-op"


def test_description_is_cosmetic_and_protect_is_lock_only(proj):
    apply_all(proj)
    proj.write({"llmops.yaml": CONFIG.replace("b: {source: data/b.jsonl}",
                                              "b: {source: data/b.jsonl, description: hello}")})
    assert not plan_of(proj).has_changes
    proj.write({"llmops.yaml": CONFIG.replace("b: {source: data/b.jsonl}",
                                              "b: {source: data/b.jsonl, protect: true}")})
    p = opened(proj)
    plan = make_plan(p)
    change = plan.get("datasets.b")
    assert change.action == "update" and change.lock_only
    ep.reset()
    report = apply_plan(p, plan)
    assert report.ok and ep.CALLS == []  # no provider call for a lock-only change
    assert load_lock(proj.path("llmops.lock")).resources["datasets.b"].spec["protect"] is True


def test_removed_resource_is_deleted_unless_protected(proj):
    apply_all(proj)
    proj.write({"llmops.yaml": CONFIG.replace("  b: {source: data/b.jsonl}\n", "")})
    plan = plan_of(proj)
    assert plan.get("datasets.b").action == "delete"
    assert plan.get("datasets.b").reasons == ["removed from llmops.yaml"]
    report, _ = apply_all(proj)
    assert report.ok and "datasets.b" not in load_lock(proj.path("llmops.lock")).resources
    assert not proj.path("out/datasets.b.txt").exists()


def test_deleting_a_protected_resource_fails_the_plan(proj):
    proj.write({"llmops.yaml": CONFIG.replace("b: {source: data/b.jsonl}", "b: {source: data/b.jsonl, protect: true}")})
    apply_all(proj)
    proj.write({"llmops.yaml": CONFIG.replace("  b: {source: data/b.jsonl}\n", "")})
    with pytest.raises(PlanError, match=r"delete protected resources: datasets.b.*protect: false"):
        plan_of(proj)


def test_failure_skips_dependents_and_lock_keeps_successes(proj):
    proj.write({"FAIL_m": ""})
    report, _ = apply_all(proj, parallelism=1)
    assert "base_models.m" in report.failed
    assert report.skipped["finetunes.f"] == "upstream base_models.m failed"
    assert {"evals.e", "deployments.d"} <= set(report.skipped)
    lock = load_lock(proj.path("llmops.lock"))
    assert "base_models.m" not in lock.resources and "finetunes.f" not in lock.resources
    # Resume: fix the failure, and only what is missing is applied.
    proj.path("FAIL_m").unlink()
    ep.reset()
    plan = plan_of(proj)
    assert {a for a, act in actions(plan).items() if act != "no-op"} == {
        a for a in actions(plan) if a not in lock.resources}
    report, _ = apply_all(proj)
    assert report.ok


def test_keep_going_applies_independent_work(proj):
    proj.write({"FAIL_a": ""})
    report, _ = apply_all(proj, parallelism=1, keep_going=True)
    assert "datasets.a" in report.failed
    assert "datasets.b" in report.applied and "prompts.p" in report.applied
    report2, _ = apply_all(proj, parallelism=1, keep_going=False)
    assert "datasets.a" in report2.failed


def test_independent_resources_run_in_parallel(proj):
    proj.write({"SLOW_a": "", "SLOW_b": ""})
    import threading

    threading.Timer(0.6, lambda: [proj.path("SLOW_a").unlink(), proj.path("SLOW_b").unlink()]).start()
    report, _ = apply_all(proj, parallelism=2)
    assert report.ok
    assert ep.max_concurrency() == 2


def test_refresh_detects_drift_and_refresh_false_ignores_it(proj):
    apply_all(proj)
    proj.path("out/datasets.b.txt").unlink()
    plan = plan_of(proj)
    assert plan.get("datasets.b").action == "replace"
    assert plan.get("datasets.b").reasons == ["drift: output missing: out/datasets.b.txt"]
    assert not plan_of(proj, refresh=False).has_changes


def test_select_limits_to_upstreams_and_replace_forces(proj):
    plan = plan_of(proj, select=["finetunes.f"])
    assert set(actions(plan)) == {"datasets.a", "prompts.p", "base_models.m", "finetunes.f"}
    apply_all(proj)
    plan = plan_of(proj, replace=["datasets.b"])
    assert plan.get("datasets.b").action == "replace"
    assert "forced by --replace" in plan.get("datasets.b").reasons


def test_saved_plan_is_refused_when_lock_config_or_live_state_moved(proj):
    p = opened(proj)
    saved = make_plan(p)
    check_saved_plan(opened(proj), saved)  # fresh: accepted
    proj.write({"data/b.jsonl": '{"question": "other"}\n'})
    with pytest.raises(StalePlanError, match="llmops.yaml or a file it reads changed"):
        check_saved_plan(opened(proj), saved)
    apply_all(proj)
    saved = make_plan(opened(proj))
    proj.path("out/datasets.a.txt").unlink()
    with pytest.raises(StalePlanError, match="live state"):
        check_saved_plan(opened(proj), saved)
    saved = make_plan(opened(proj))
    apply_all(proj)
    with pytest.raises(StalePlanError, match="llmops.lock changed"):
        check_saved_plan(opened(proj), saved)


def test_kind_without_provider_fails_apply_with_clear_message(proj):
    p = open_project(proj.root, provider_overrides={k: v for k, v in ep.OVERRIDES.items() if k != "deployments"})
    p.provider_overrides  # the others are real test providers
    import llmops.providers as providers

    orig = providers._PROVIDERS.pop("deployments")
    try:
        plan = make_plan(p)
        report = apply_plan(p, plan)
    finally:
        providers._PROVIDERS["deployments"] = orig
    assert "cannot apply `deployments` resources yet" in report.failed["deployments.d"]
    assert "evals.e" in report.applied


def test_open_alerts_are_shown_by_plan_but_are_not_changes(proj):
    apply_all(proj)
    proj.write({"ALERT_d": "drift: PSI 0.31 > 0.2 on prompt length"})
    plan = plan_of(proj)
    assert not plan.has_changes
    assert plan.alerts == [("deployments.d", "drift: PSI 0.31 > 0.2 on prompt length")]
    assert plan_of(proj, refresh=False).alerts == []
    from llmops.operations.plan_markdown import plan_to_markdown

    assert "> - `deployments.d`: drift: PSI 0.31 > 0.2 on prompt length" in plan_to_markdown(plan)


def test_a_rebuild_for_drift_or_replace_is_followed_downstream(proj):
    apply_all(proj)
    proj.path("out/datasets.a.txt").unlink()
    plan = plan_of(proj)
    assert plan.get("datasets.a").action == "replace"
    assert plan.get("base_models.m").action == "replace"
    assert plan.get("base_models.m").reasons == ["upstream datasets.a will be replaced"]
    assert plan.get("evals.e").action == "replace"
    assert plan.get("deployments.d").action == "update"  # re-checks its gates in place
    assert plan.get("prompts.p").action == plan.get("datasets.b").action == "no-op"
    plan = plan_of(proj, refresh=False, replace=["finetunes.f"])
    assert plan.get("evals.e").reasons == ["upstream finetunes.f will be replaced"]


def test_a_missing_output_held_by_a_store_is_restored_and_nothing_downstream_rebuilds(proj):
    proj.path("store").mkdir()
    apply_all(proj)
    proj.path("out/datasets.a.txt").unlink()
    plan = plan_of(proj)
    assert actions(plan)["datasets.a"] == "restore"
    assert plan.get("datasets.a").reasons == ["drift: output missing: out/datasets.a.txt; the store holds it"]
    assert {a for a, act in actions(plan).items() if act != "no-op"} == {"datasets.a"}
    assert plan.summary_line() == "Plan: 0 to create, 1 to restore, 0 to replace, 0 to update, 0 to delete."
    ep.reset()
    report, _ = apply_all(proj)
    assert report.ok and ep.CALLS == [("datasets.a", "restore")]
    assert proj.path("out/datasets.a.txt").exists()
    assert not plan_of(proj).has_changes
    # Without the store's copy the same drift is a rebuild, followed downstream.
    proj.path("out/datasets.a.txt").unlink()
    for held in proj.path("store").glob("datasets.a.*"):
        held.unlink()
    plan = plan_of(proj)
    assert actions(plan)["datasets.a"] == "replace" and actions(plan)["finetunes.f"] == "replace"


def test_an_output_made_elsewhere_for_the_same_fingerprint_is_restored_not_rebuilt(proj):
    proj.path("store").mkdir()
    apply_all(proj)
    old_lock = proj.read("llmops.lock")
    # Another checkout (say, a pull request's CI job) applies a new learning rate ...
    proj.write({"llmops.yaml": CONFIG.replace("0.0002", "0.0001")})
    apply_all(proj)
    # ... and this one merges the config without that lock, its outputs absent here.
    proj.write({"llmops.lock": old_lock})
    for rel in ("out/finetunes.f.txt", "out/evals.e.txt"):
        proj.path(rel).unlink()
    plan = plan_of(proj)
    assert actions(plan)["finetunes.f"] == "restore"
    assert any(r.startswith("made elsewhere for this fingerprint") for r in plan.get("finetunes.f").reasons)
    assert actions(plan)["evals.e"] == "restore"
    assert actions(plan)["deployments.d"] == "update"
    assert plan_of(proj, refresh=False).get("finetunes.f").action == "replace"  # no store lookups
    assert plan_of(proj, replace=["finetunes.f"]).get("finetunes.f").action == "replace"
    ep.reset()
    report, _ = apply_all(proj)
    assert report.ok
    assert sorted(ep.CALLS) == [("deployments.d", "update"), ("evals.e", "restore"), ("finetunes.f", "restore")]
    assert not plan_of(proj).has_changes


def test_a_restore_whose_store_lost_the_output_fails_and_says_so(proj):
    proj.path("store").mkdir()
    apply_all(proj)
    proj.path("out/datasets.b.txt").unlink()
    p = opened(proj)
    plan = make_plan(p)
    for held in proj.path("store").glob("datasets.b.*"):
        held.unlink()
    report = apply_plan(p, plan)
    assert report.failed == {"datasets.b": "datasets.b: the store no longer holds it"}


class _Warming:
    """A provider kind whose warm-up (heavy imports, a store check) is slow or fails."""

    def __init__(self, kind: str, gate, fail: str | None = None):
        self.cls = type(f"Warming_{kind}", (ep.make(kind),), {"warm_up": lambda prov: self._warm(prov)})
        self.gate, self.fail, self.thread = gate, fail, None

    def _warm(self, prov):
        import threading

        self.thread = threading.current_thread().name
        assert self.gate.wait(30), "the warm-up was never released"
        if self.fail:
            raise ProviderError(self.fail)


def test_light_work_starts_while_another_kind_warms_up(proj):
    """Warm-up runs beside apply: datasets (no warm-up) apply while prompts' warm-up is held;
    the prompt and everything after it wait for that warm-up, in its own thread."""
    import threading

    gate = threading.Event()
    warming = _Warming("prompts", gate)
    overrides = {**ep.OVERRIDES, "prompts": warming.cls}
    p = open_project(proj.root, provider_overrides=overrides)
    plan = make_plan(p)
    seen_before_release: list = []

    class Hooks(ApplyHooks):
        def post_apply(self, change, error):
            if change.address == "datasets.b":  # the last dataset: both ran with the gate shut
                seen_before_release.extend(a for a, _ in ep.CALLS)
                gate.set()

    report = apply_plan(p, plan, hooks=Hooks(), parallelism=2)
    assert report.ok, report.failed
    assert {"datasets.a", "datasets.b"} <= set(seen_before_release)
    assert "prompts.p" not in seen_before_release and "finetunes.f" not in seen_before_release
    assert warming.thread == "llmops-warm-up"


def test_a_failed_warm_up_fails_its_kind_with_the_message_and_spares_the_rest(proj):
    import threading

    gate = threading.Event()
    gate.set()
    warming = _Warming("prompts", gate, fail="prompts: the MLflow store at sqlite:///x cannot be opened; fix settings.tracking_uri")
    p = open_project(proj.root, provider_overrides={**ep.OVERRIDES, "prompts": warming.cls})
    report = apply_plan(p, make_plan(p), parallelism=1, keep_going=True)
    assert report.failed["prompts.p"] == "prompts: the MLflow store at sqlite:///x cannot be opened; fix settings.tracking_uri"
    assert {"datasets.a", "datasets.b", "base_models.m"} <= set(report.applied)
    assert report.skipped["finetunes.f"] == "upstream prompts.p failed"
    assert ("prompts.p", "create") not in ep.CALLS
    assert "prompts.p" not in load_lock(proj.path("llmops.lock")).resources


# --- the provider contract, as the engine keeps it -------------------------------------

def test_reasons_carry_codes_that_code_branches_on(proj):
    apply_all(proj)
    proj.write({"llmops.yaml": CONFIG.replace("learning_rate: 0.0002", "learning_rate: 0.0001")})
    plan = plan_of(proj)
    ft, ev = plan.get("finetunes.f"), plan.get("evals.e")
    assert ft.codes == ["field:training.learning_rate"] and len(ft.reasons) == 1
    assert ev.codes == ["upstream-changed:finetunes.f"]
    proj.write({"llmops.yaml": CONFIG})
    proj.path("out/datasets.b.txt").unlink()
    assert plan_of(proj).get("datasets.b").codes == ["drift:missing"]
    assert plan_of(proj, replace=["datasets.a"]).get("datasets.a").codes == ["forced"]
    from llmops.engine.planfile import load_plan, save_plan

    save_plan(plan, proj.path("plan.json"))  # the codes survive the plan file
    assert load_plan(proj.path("plan.json")).get("finetunes.f").codes == ["field:training.learning_rate"]


def test_apply_hands_providers_the_plans_specs_upstream_specs_and_a_log(proj):
    logs = []

    class Hooks(ApplyHooks):
        def __init__(self):
            self.summaries = {}

        def log(self, address, message):
            logs.append((address, message))

        def recorded(self, change, outputs, summary=""):
            self.summaries[change.address] = summary

    p = opened(proj)
    plan = make_plan(p)
    proj.write({"llmops.yaml": CONFIG.replace("alias: production", "alias: staging")})  # after the plan
    hooks = Hooks()
    assert apply_plan(p, plan, hooks=hooks).ok
    request = ep.REQUESTS["deployments.d"]
    assert request.spec["alias"] == "production"  # the planned spec, not llmops.yaml re-read
    # every resource it depends on, directly or not, with its spec
    assert sorted(request.upstream_specs) == ["base_models.m", "datasets.a", "evals.e", "finetunes.f", "prompts.p"]
    assert request.upstream_specs["finetunes.f"]["training"] == {"learning_rate": 0.0002}
    assert sorted(request.upstream) == ["evals.e", "finetunes.f"]  # lock entries: direct upstreams
    assert ("deployments.d", "applying create") in logs
    assert hooks.summaries["datasets.a"] == "wrote out/datasets.a.txt"


def test_a_saved_plan_applies_the_specs_it_was_made_from(proj):
    from llmops.engine.planfile import load_plan, save_plan

    save_plan(make_plan(opened(proj)), proj.path("plan.json"))
    p = opened(proj)
    saved = load_plan(proj.path("plan.json"))
    assert saved.specs == {}  # never written to the file (specs may hold secrets)
    check_saved_plan(p, saved)
    assert apply_plan(p, saved).ok
    assert ep.REQUESTS["finetunes.f"].spec["training"] == {"learning_rate": 0.0002}
    unchecked = load_plan(proj.path("plan.json"))
    report = apply_plan(opened(proj), unchecked)
    assert "the plan holds no spec for it" in next(iter(report.failed.values()))


def test_a_spec_of_defaults_only_gains_one_field_not_a_root_change():
    """`monitors.m: {}` (everything default) to `{log_text: true}` is one changed field, which
    the kind may apply in place; the empty spec is not itself a changed field named ""."""
    from llmops.engine.plan import ResourceChange
    from llmops.engine.planner import _field_diffs

    why = ResourceChange("monitors.m", "no-op", [], None, None)
    assert _field_diffs({}, {"log_text": True}, why, "monitors") == {"log_text"}
    assert why.codes == ["field:log_text"] and why.reasons == ["log_text: false (default) -> true"]
