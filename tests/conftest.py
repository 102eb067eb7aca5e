"""Shared test set-up: offline environment, and a temporary project folder helper."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Tests never touch the network or send telemetry, and run as outside GitHub Actions even
# when CI is GitHub Actions (validate/plan would annotate and write the job's summary).
for _var in ("GITHUB_ACTIONS", "GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY", "GITHUB_ENV"):
    os.environ.pop(_var, None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("GIT_AUTHOR_NAME", "llmops-tests")
os.environ.setdefault("GIT_AUTHOR_EMAIL", "tests@example.invalid")
os.environ.setdefault("GIT_COMMITTER_NAME", "llmops-tests")
os.environ.setdefault("GIT_COMMITTER_EMAIL", "tests@example.invalid")

REPO = Path(__file__).resolve().parents[1]


class Project:
    """A temporary project folder: `write` files into it, `run` the real CLI in it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, files: dict[str, str]) -> "Project":
        for rel, text in files.items():
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text) if rel.endswith((".yaml", ".yml", ".j2")) else text)
        return self

    def path(self, rel: str) -> Path:
        return self.root / rel

    def read(self, rel: str) -> str:
        return (self.root / rel).read_text()

    def copy_example(self) -> "Project":
        """The example project's data and prompts (the realistic inputs of end-to-end tests)."""
        import shutil

        for folder in ("data", "prompts"):
            if not (self.root / folder).exists():
                shutil.copytree(REPO / "example-project" / folder, self.root / folder)
        return self

    def locked(self) -> dict:
        """llmops.lock's resources, parsed."""
        import yaml

        return yaml.safe_load(self.read("llmops.lock"))["resources"]

    def run(self, *args: str, input: str | None = None, env: dict | None = None, timeout: float = 600):
        """Run `llmops ARGS` as a subprocess (the real entry point) in the project folder."""
        full_env = dict(os.environ)
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "llmops", *args],
            cwd=self.root,
            input=input,
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
        )

    def invoke(self, *args: str, input: str | None = None):
        """Run the CLI in-process (faster; for tests that do not need a fresh interpreter)."""
        from click.testing import CliRunner

        from llmops.cli.main import cli

        old = os.getcwd()
        os.chdir(self.root)
        try:
            return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)
        finally:
            os.chdir(old)


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """The Docker engine's host (`.ci/docker-setup.sh` starts one), or a skip saying why not."""
    from dockerd import ensure_docker, skip_reason

    host = ensure_docker()
    if host is None:
        pytest.skip(f"no Docker engine can run here: {skip_reason()}")
    return host


@pytest.fixture
def project(tmp_path: Path) -> Project:
    root = tmp_path / "proj"
    root.mkdir()
    return Project(root)


# --- Shared stores: real services on loopback (tests/services.py) ------------------------


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A throwaway PostgreSQL cluster (tests/services.py `PostgresCluster`: password auth over
    TCP, databases `mlflow` and `requests`). Skips with the reason when it cannot run here."""
    import importlib.util
    import tempfile

    from services import ServiceUnavailable, postgres_cluster

    if importlib.util.find_spec("psycopg") is None:
        pytest.skip("psycopg is not installed (pip install -e '.[dev]')")
    # Not under pytest's basetemp: that is 0700 and root's, and the cluster's owner is `postgres`.
    cluster_dir = Path(tempfile.mkdtemp(prefix="llmops-pg-"))
    try:
        with postgres_cluster(cluster_dir) as cluster:
            yield cluster
    except ServiceUnavailable as exc:
        pytest.skip(exc.reason)


@pytest.fixture(scope="session")
def pg_mlflow_server(pg_cluster, tmp_path_factory: pytest.TempPathFactory):
    """Tracking URL of a real `mlflow server` backed by the `pg_cluster` (psycopg 3 driver),
    artifacts proxied by the server into a temp folder."""
    from services import ServiceUnavailable, mlflow_server

    folder = tmp_path_factory.mktemp("pg-mlflow")
    try:
        with mlflow_server(pg_cluster.uri, folder / "artifacts", log_file=folder / "server.log") as url:
            yield url
    except ServiceUnavailable as exc:
        pytest.skip(exc.reason)


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of moto's S3 server on 127.0.0.1 (credentials: any, e.g. `testing`).
    Skips with the reason when moto is not installed."""
    from services import ServiceUnavailable, moto_s3_server

    try:
        with moto_s3_server() as url:
            yield url
    except ServiceUnavailable as exc:
        pytest.skip(exc.reason)


# The longest files first: with `--dist loadfile` (scripts/test.sh) each file runs on one
# worker, so a long file collected last would run alone at the end. Order within a file stays.
SLOW_FIRST = ("test_shared_state.py", "test_deploy_flow.py", "test_example.py", "test_secrets.py", "test_self_healing.py",
              "test_serve_identity.py", "test_docker_serve.py", "test_mlflow_server.py", "test_init_apply.py",
              "test_approval_bypass.py", "test_monitor_flow.py", "test_apply_lock.py", "test_docker_finetune.py",
              "test_prompts_provider.py", "test_s3_stores.py", "test_mlflow_model.py", "test_finetunes_provider.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))

