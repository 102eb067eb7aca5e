"""Plan's refresh reads live state in bulk: one registry search per kind, one `dvc status` per
project, instead of one call per resource. And it finds exactly what asking about each
resource on its own finds: the same drift, worded the same (real MLflow on SQLite, real DVC).

A local SQLite store is read in bulk with the standard library (`sqlite`), else through the
MlflowClient's searches (`client`): both are run against the same real store."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import copy_prepared_mlflow_db

from llmops.integrations import mlflow as tracking
from llmops.engine.lockfile import LockedResource
from llmops.engine.planner import make_plan
from llmops.engine.project import open_project


def _changes(plan) -> dict[str, tuple[str, list[str]]]:
    return {c.address: (c.action, list(c.reasons)) for c in plan.changes}


@pytest.fixture()
def calls(monkeypatch):
    """Counts calls of the real MlflowClient's methods named in `watch(...)`."""
    from mlflow.tracking import MlflowClient

    counts: Counter[str] = Counter()

    def watch(*names: str) -> Counter[str]:
        for name in names:
            real = getattr(MlflowClient, name)

            def counted(self, *args, _real=real, _name=name, **kwargs):
                counts[_name] += 1
                return _real(self, *args, **kwargs)

            monkeypatch.setattr(MlflowClient, name, counted)
        return counts

    return watch


PROMPTS = "version: 1\nproject: bulk\nprompts:\n" + "".join(
    f'  p{i}: {{text: "Q{i}: {{{{ question }}}}", variables: [question]}}\n' for i in range(6))


@pytest.fixture(params=["client", "sqlite"])
def bulk_path(request, monkeypatch):
    monkeypatch.setattr(tracking, "SQLITE_BULK", request.param == "sqlite")
    return request.param


def test_prompts_refresh_is_one_registry_search_and_finds_the_same_drift(project, calls, monkeypatch, bulk_path):
    project.write({"llmops.yaml": PROMPTS})
    monkeypatch.setattr(tracking, "SQLITE_BULK", True)  # the apply as a fresh `llmops apply` runs it
    res = project.run("apply", "--auto-approve")
    assert res.returncode == 0, res.stdout + res.stderr
    monkeypatch.setattr(tracking, "SQLITE_BULK", bulk_path == "sqlite")
    c = tracking.client(project.root, {})
    c.register_prompt(name="p1", template="moved {{ question }}")  # v2, and the alias moves to it
    c.set_prompt_alias("p1", "default", 2)
    c.delete_prompt_version("p2", 1)  # its alias goes with it
    c.delete_prompt_alias("p3", "default")

    counts = calls("search_registered_models", "get_prompt_version_by_alias", "get_prompt_version")
    bulk = _changes(make_plan(open_project(project.root)))
    assert counts["search_registered_models"] == (1 if bulk_path == "client" else 0)  # all six prompts at once
    assert counts["get_prompt_version_by_alias"] == 3  # only the three not in sync are asked about singly

    monkeypatch.setattr(tracking, "bulk_aliases", lambda *a, **k: None)  # the store "cannot" search: per resource
    counts.clear()
    single = _changes(make_plan(open_project(project.root)))
    assert counts["search_registered_models"] == 0 and counts["get_prompt_version_by_alias"] == 6
    assert bulk == single
    assert bulk["prompts.p1"] == ("update", ["drift: prompt alias default -> v2, lock says v1"])
    assert bulk["prompts.p2"][0] == "update" and "p2 v1 is not in the prompt registry" in bulk["prompts.p2"][1][0]
    assert bulk["prompts.p3"] == ("update", ["drift: prompt alias default of p3 is missing in the registry"])
    assert {a for a, (action, _) in bulk.items() if action == "no-op"} == {"prompts.p0", "prompts.p4", "prompts.p5"}


def _registry_fixture(root):
    """Real runs and registered versions for four fine-tunes and three evals, and lock entries
    naming them; then drift: a fine-tune run deleted, a registered version deleted, an eval
    run deleted, an eval run id the store never had. The store starts as the client would create
    it here (the suite's prepared empty store: no migrations)."""
    copy_prepared_mlflow_db(root / ".llmops" / "mlflow.db", Path.cwd() / "mlruns")
    c = tracking.client(root, {})
    exp = c.create_experiment("bulk")
    finetunes, evals = [], []
    for i in range(4):
        run = c.create_run(exp).info.run_id
        c.create_registered_model(f"f{i}")
        version = c.create_model_version(f"f{i}", f"runs:/{run}/model", run).version
        adapter = root / "adapters" / f"f{i}"
        adapter.mkdir(parents=True)
        (adapter / "adapter_model.safetensors").write_bytes(b"x")
        finetunes.append((f"f{i}", {}, LockedResource(f"finetunes.f{i}", "sha256:f", outputs={
            "run_id": run, "model_name": f"f{i}", "model_version": int(version),
            "adapter": {"path": f"adapters/f{i}"}})))
    for i in range(3):
        run = c.create_run(exp).info.run_id
        evals.append((f"e{i}", {}, LockedResource(f"evals.e{i}", "sha256:e", outputs={"run_id": run})))
    c.delete_run(finetunes[1][2].outputs["run_id"])
    c.delete_model_version("f2", "1")
    c.delete_run(evals[1][2].outputs["run_id"])
    evals[2][2].outputs["run_id"] = "0" * 32
    return finetunes, evals


def _refresh_all(provider, entries, bulk: bool) -> dict[str, list]:
    if bulk:
        provider.begin_refresh(entries)
    try:
        return {name: provider.refresh(name, spec, locked) for name, spec, locked in entries}
    finally:
        provider.plan_done()


def test_runs_and_versions_are_read_in_one_search_per_kind(project, calls, bulk_path):
    project.write({"llmops.yaml": "version: 1\nproject: bulk\n"})
    finetunes, evals = _registry_fixture(project.root)
    proj = open_project(project.root)
    counts = calls("search_runs", "search_model_versions", "get_run", "get_model_version")
    ft, ev = proj.provider("finetunes"), proj.provider("evals")

    bulk = {"finetunes": _refresh_all(ft, finetunes, True), "evals": _refresh_all(ev, evals, True)}
    if bulk_path == "client":
        assert counts["search_runs"] == 2 and counts["search_model_versions"] == 1  # one per kind
    else:
        assert counts["search_runs"] == counts["search_model_versions"] == 0
    # Singly only what the bulk reads did not show in sync: f1's run, f2's version, e1, e2.
    assert counts["get_run"] == 1 + 1 + 2 and counts["get_model_version"] == 1

    counts.clear()
    single = {"finetunes": _refresh_all(ft, finetunes, False), "evals": _refresh_all(ev, evals, False)}
    assert counts["search_runs"] == counts["search_model_versions"] == 0
    assert bulk == single
    assert bulk["finetunes"]["f0"] == bulk["finetunes"]["f3"] == [] and bulk["evals"]["e0"] == []
    assert "was deleted from the tracking store" in bulk["finetunes"]["f1"][0].reason
    assert "registered model f2 v1 is not in the model registry" in bulk["finetunes"]["f2"][0].reason
    assert "was deleted from the tracking store" in bulk["evals"]["e1"][0].reason
    assert "is not in the tracking store" in bulk["evals"]["e2"][0].reason


def test_a_refresh_outside_a_plan_reads_nothing_in_bulk(project, bulk_path):
    """Bulk reads last one plan: a provider asked again later reads the store again."""
    project.write({"llmops.yaml": "version: 1\nproject: bulk\n"})
    finetunes, evals = _registry_fixture(project.root)
    ev = open_project(project.root).provider("evals")
    assert _refresh_all(ev, evals, True)["e0"] == []
    tracking.client(project.root, {}).delete_run(evals[0][2].outputs["run_id"])
    assert "was deleted" in _refresh_all(ev, evals, False)["e0"][0].reason
    assert "was deleted" in _refresh_all(ev, evals, True)["e0"][0].reason


DATASETS = "version: 1\nproject: bulk\nsettings: {dvc_remote: dvc-store}\ndatasets:\n" + "".join(
    f"  d{i}: {{source: data/d{i}.jsonl}}\n" for i in range(3))


def test_dvc_remote_is_asked_once_per_project(project, monkeypatch):
    from llmops.providers import datasets

    rows = "".join(f'{{"question": "q{j}", "answer": "a{j}"}}\n' for j in range(20))
    project.write({"llmops.yaml": DATASETS, **{f"data/d{i}.jsonl": rows.replace("q", f"q{i}-") for i in range(3)}})
    res = project.run("apply", "--auto-approve")
    assert res.returncode == 0, res.stdout + res.stderr
    locked = project.locked()
    shutil.rmtree(project.path(".dvc/cache"))
    for i in (0, 1):
        project.path(locked[f"datasets.d{i}"]["outputs"]["train"]["path"]).unlink()

    asked: list[list[str]] = []
    real = datasets.remote_status

    def counted(root, stage, remote, log):
        asked.append([stage] if isinstance(stage, str) else list(stage))
        return real(root, stage, remote, log)

    monkeypatch.setattr(datasets, "remote_status", counted)
    bulk = _changes(make_plan(open_project(project.root)))
    assert asked == [["datasets-d0", "datasets-d1"]]  # d2 lost only its cache: no remote needed

    asked.clear()
    monkeypatch.setattr(datasets, "remote_statuses", lambda root, outs: {})  # per resource, as before
    single = _changes(make_plan(open_project(project.root)))
    assert asked == [["datasets-d0"], ["datasets-d1"]]
    assert bulk == single
    for i in (0, 1):
        action, reasons = bulk[f"datasets.d{i}"]
        assert action == "restore" and "dvc-store holds the locked content: will be checked out" in reasons[0], reasons
    assert bulk["datasets.d2"][0] == "restore" and "they will be cached again" in bulk["datasets.d2"][1][0]


def test_a_healthy_refresh_of_a_local_store_never_loads_mlflow(project):
    """What makes refresh cheap on the embedded store: a plan that finds everything in sync
    reads the SQLite database directly and never imports MLflow (over a second by itself)."""
    import subprocess
    import sys

    project.write({"llmops.yaml": PROMPTS})
    res = project.run("apply", "--auto-approve")
    assert res.returncode == 0, res.stdout + res.stderr
    code = ("import sys; from pathlib import Path; from llmops.engine.planner import make_plan; "
            "from llmops.engine.project import open_project; plan = make_plan(open_project(Path('.')), refresh=True); "
            "print(plan.has_changes, 'mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=project.root, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr
    tracking.client(project.root, {}).set_prompt_alias("p0", "default", 1)  # in sync still: same version
    tracking.client(project.root, {}).delete_prompt_alias("p4", "default")
    out = subprocess.run([sys.executable, "-c", code], cwd=project.root, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr  # drift: asked through MLflow


def test_a_store_it_cannot_read_directly_goes_through_mlflow(project, calls, monkeypatch):
    """MLflow workspaces on, or tables without the expected columns: the MlflowClient path."""
    project.write({"llmops.yaml": "version: 1\nproject: bulk\n"})
    finetunes, evals = _registry_fixture(project.root)
    uri = tracking.tracking_uri(project.root, {})
    ids = [locked.outputs["run_id"] for _, _, locked in evals]
    direct = tracking._sqlite_runs(uri, ids)
    assert direct is not None and sorted(direct.values()) == ["active", "deleted"]
    monkeypatch.setenv("MLFLOW_WORKSPACE", "team-a")
    assert tracking._sqlite_runs(uri, ids) is None
    monkeypatch.delenv("MLFLOW_WORKSPACE")
    assert tracking._sqlite_rows(uri, {"runs": {"run_uuid", "no_such_column"}}, "SELECT 1", ids) is None
    counts = calls("search_runs")
    assert tracking.bulk_runs(lambda: tracking.client(project.root, {}), ids) == direct  # no uri: the client
    assert counts["search_runs"] == 1
