"""Shared state: two checkouts, one tracking server (PostgreSQL-backed, artifacts proxied) and
one DVC remote folder. A fresh clone restores instead of rebuilding; main promotes exactly the
version a pull request's CI job trained and evaluated, found by fingerprint, training nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, Project, dvc_cli

# The two checkouts' CLI calls start model servers that outlive the command: each runs in a fresh
# interpreter, as a user's would (tests/conftest.py `Project.run`). The `project` fixture's calls
# start none and run in this interpreter, unless a call says otherwise.
SERVES_MODELS = True

CONFIG = """\
version: 1
project: shared
settings: {{tracking_uri: "{uri}", dvc_remote: ../dvc-remote}}
datasets:
  tickets: {{source: data/tickets.jsonl, prepare: [{{split: {{eval_fraction: 0.1, seed: 13}}}}]}}
prompts:
  support: {{template: prompts/support.j2, variables: [question]}}
base_models:
  tiny: {{build: {{architecture: llama, hidden_size: 32, layers: 1, heads: 2, intermediate_size: 64, tokenizer_from: tickets}}}}
finetunes:
  shared-lora: {{base_model: tiny, dataset: tickets, prompt: support, training: {{max_steps: 3, batch_size: 4, max_seq_length: 64, learning_rate: {lr}}}}}
evals:
  quality: {{model: shared-lora, dataset: tickets, metrics: [perplexity], thresholds: {{perplexity: "<= 1000000"}}, decoding: {{max_new_tokens: 2}}, limit: 4}}
deployments:
  prod: {{model: shared-lora, alias: production, gates: [quality], serve: {{port: {port}, startup_timeout: 240}}}}
"""

# What a fresh clone must never rebuild when the stores hold the outputs.
BUILT_KINDS = ("datasets", "prompts", "base_models", "finetunes", "evals")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def ok(res) -> str:
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def actions(checkout: Project) -> dict[str, str]:
    plan = json.loads(ok(checkout.run("plan", "--json")))
    return {c["address"]: c["action"] for c in plan["resource_changes"]}


def dvc_status(checkout: Project) -> str:
    proc = dvc_cli(checkout.root, "status")
    return proc.stdout + proc.stderr


class Registry:
    """What the tracking server holds: training runs and registered versions. The server lives
    for the whole test session, so this project's names are its own (`shared`, `shared-lora`)."""

    def __init__(self, uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def training_runs(self) -> int:
        exp = self.client.get_experiment_by_name("shared")
        return len(self.client.search_runs([exp.experiment_id])) if exp else 0

    def versions(self) -> list[str]:
        return sorted(v.version for v in self.client.search_model_versions("name = 'shared-lora'"))

    def production(self) -> str:
        return str(self.client.get_model_version_by_alias("shared-lora", "production").version)


def health(checkout: Project) -> dict:
    url = checkout.locked()["deployments.prod"]["outputs"]["endpoint"]
    with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_a_clone_restores_and_main_promotes_the_version_its_pull_request_trained(tmp_path, pg_mlflow_server):
    uri = pg_mlflow_server
    registry = Registry(uri)
    port = free_port()  # the one port both checkouts serve on (one at a time: `llmops down`)
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(origin))
    a = Project(tmp_path / "a", subprocess=SERVES_MODELS)
    a.root.mkdir()
    shutil.copytree(REPO / "example-project" / "data", a.root / "data")
    shutil.copytree(REPO / "example-project" / "prompts", a.root / "prompts")
    a.write({"llmops.yaml": CONFIG.format(uri=uri, lr="0.0002", port=port), ".gitignore": ".llmops/\n"})
    git(a.root, "init", "-q", "-b", "main")
    b = Project(tmp_path / "b", subprocess=SERVES_MODELS)
    try:
        # Checkout A applies everything and pushes its lock.
        ok(a.run("apply", "--auto-approve"))
        assert registry.versions() == ["1"] and registry.production() == "1"
        git(a.root, "add", "-A")
        git(a.root, "commit", "-q", "-m", "apply")
        git(a.root, "remote", "add", "origin", str(origin))
        git(a.root, "push", "-q", "origin", "main")
        for committed in ("dvc.yaml", "dvc.lock", "llmops.lock", ".dvc/config"):
            assert str(tmp_path) not in a.read(committed), f"{committed} names a path of this machine"

        ok(a.run("down", "prod"))
        git(a.root, "checkout", "-q", "llmops.lock")  # `down` dropped the endpoint; keep the pushed lock

        # A fresh clone elsewhere, its own .llmops/: restore, never rebuild.
        git(tmp_path, "clone", "-q", str(origin), str(b.root))
        planned = actions(b)
        rebuilt = {addr: act for addr, act in planned.items()
                   if addr.split(".")[0] in BUILT_KINDS and act in ("create", "replace")}
        assert rebuilt == {}, planned
        assert planned["datasets.tickets"] == planned["base_models.tiny"] == planned["finetunes.shared-lora"] == "restore"
        assert planned["deployments.prod"] == "update"  # nothing serves it here yet
        runs = registry.training_runs()
        out = ok(b.run("apply", "--auto-approve"))
        assert "restoring" in out and "replacing" not in out, out
        assert registry.training_runs() == runs  # trained nothing
        assert registry.versions() == ["1"]  # registered nothing
        assert health(b)["status"] == "ok"  # and serves
        assert b.run("plan", "--detailed-exitcode").returncode == 0
        assert "up to date" in dvc_status(b), dvc_status(b)
        adapter = b.locked()["finetunes.shared-lora"]["outputs"]["adapter"]
        assert adapter == a.locked()["finetunes.shared-lora"]["outputs"]["adapter"]
        ok(b.run("down", "prod"))
        git(b.root, "checkout", "-q", "llmops.lock")

        # A pull request (checkout B) changes the learning rate; its CI job trains and evaluates
        # the candidate against the shared stores and commits the lock. A pulls: only the promotion.
        b.write({"llmops.yaml": CONFIG.format(uri=uri, lr="0.0001", port=port)})
        ok(b.run("apply", "--auto-approve", "--select", "evals.quality"))
        assert registry.versions() == ["1", "2"] and registry.production() == "1"
        git(b.root, "commit", "-q", "-am", "learning rate 1e-4")
        git(b.root, "push", "-q", "origin", "main")
        git(a.root, "pull", "-q", "origin", "main")
        planned = {k: v for k, v in actions(a).items() if v != "no-op"}
        assert planned == {"finetunes.shared-lora": "restore", "deployments.prod": "update"}
        runs = registry.training_runs()
        ok(a.run("apply", "--auto-approve"))
        assert registry.training_runs() == runs and registry.versions() == ["1", "2"]
        assert registry.production() == "2"
        assert a.locked()["deployments.prod"]["outputs"]["version"] == "2"

        # The pull request's CI job does not commit its lock (it cannot push to the PR's branch):
        # main merges only llmops.yaml. The version is found by fingerprint, and so is its eval.
        b.write({"llmops.yaml": CONFIG.format(uri=uri, lr="0.00005", port=port)})
        ok(b.run("apply", "--auto-approve", "--select", "evals.quality"))
        assert registry.versions() == ["1", "2", "3"]
        candidate = b.locked()["evals.quality"]["outputs"]
        git(b.root, "checkout", "-q", "llmops.lock", "dvc.lock")
        git(b.root, "commit", "-q", "-am", "learning rate 5e-5")
        git(b.root, "push", "-q", "origin", "main")
        git(a.root, "pull", "-q", "origin", "main")
        plan = json.loads(ok(a.run("plan", "--json")))
        planned = {c["address"]: c for c in plan["resource_changes"] if c["action"] != "no-op"}
        assert {k: c["action"] for k, c in planned.items()} == {
            "finetunes.shared-lora": "restore", "evals.quality": "restore", "deployments.prod": "update"}
        assert any("version 3 of shared-lora was trained for this fingerprint" in r
                   for r in planned["finetunes.shared-lora"]["reasons"])
        runs = registry.training_runs()
        ok(a.run("apply", "--auto-approve"))
        assert registry.training_runs() == runs and registry.versions() == ["1", "2", "3"]
        assert registry.production() == "3"
        locked = a.locked()
        assert locked["finetunes.shared-lora"]["outputs"]["model_version"] == "3"
        assert locked["evals.quality"]["outputs"]["run_id"] == candidate["run_id"]
        assert locked["evals.quality"]["outputs"]["metrics"] == candidate["metrics"]
        assert a.run("plan", "--detailed-exitcode").returncode == 0
    finally:
        for checkout in (a, b):
            if (checkout.root / "llmops.lock").exists():
                checkout.run("down", "prod")


def test_mlflow_environment_variables_apply_when_llmops_yaml_sets_no_store(project, monkeypatch):
    from llmops.config.document import resolved_settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.invalid:5000")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "http://registry.invalid:5000")
    assert resolved_settings({})["tracking_uri"] == "http://tracking.invalid:5000"
    assert resolved_settings({})["registry_uri"] == "http://registry.invalid:5000"
    # llmops.yaml (after the target overlay) wins over the environment.
    given = resolved_settings({"settings": {"tracking_uri": "sqlite:///x.db"}})
    assert given["tracking_uri"] == "sqlite:///x.db" and given["registry_uri"] == "http://registry.invalid:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI")
    assert resolved_settings({})["tracking_uri"] == "sqlite:///.llmops/mlflow.db"
    assert "registry_uri" not in resolved_settings({})


def test_an_unreachable_tracking_server_from_the_environment_fails_plan_fast(project):
    project.copy_example()
    config = CONFIG.format(uri="", lr="0.0002", port=free_port()).replace('tracking_uri: "", ', "")
    project.write({"llmops.yaml": config})
    port = free_port()  # nothing listens here once the socket closes
    nowhere = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    res = project.run("apply", "--auto-approve", env=nowhere)
    assert res.returncode == 1
    assert f"cannot reach the MLflow tracking server http://127.0.0.1:{port}" in res.stdout + res.stderr
    assert not project.path(".llmops/mlflow.db").exists()  # the embedded store was not used instead
    # Plan's refresh reads the registry too: it fails at once, naming the server, not after retries.
    ok(project.run("apply", "--auto-approve", "--select", "datasets.tickets"))  # the embedded store
    res = project.run("plan", env=nowhere, timeout=60)
    assert res.returncode == 1 and f"http://127.0.0.1:{port}" in res.stderr, res.stdout + res.stderr
