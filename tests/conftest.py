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
    """A temporary project folder: `write` files into it, `run` the real CLI in it.

    `subprocess=True`: every `run` starts a fresh interpreter (a test module sets
    `CLI_SUBPROCESS = True` for its `project` fixture: its CLI calls start model servers that
    must outlive the command)."""

    def __init__(self, root: Path, subprocess: bool = False) -> None:
        self.root = root
        self.subprocess = subprocess

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

    def run(self, *args: str, input: str | None = None, env: dict | None = None, timeout: float | None = None,
            subprocess: bool | None = None) -> subprocess.CompletedProcess:
        """Run `llmops ARGS` in the project folder; the result is a `subprocess.CompletedProcess`.

        In this process by default (`run_in_process`: no interpreter start, no re-import per
        call). A fresh interpreter (`python -m llmops`, the real entry point) with
        `subprocess=True` (here, or on the Project unless this call says `subprocess=False`: a
        call in a `CLI_SUBPROCESS` module that starts no server), with a `timeout`, or for every call when
        LLMOPS_TEST_SUBPROCESS=1 (the old behaviour, which bench/suite_time.py compares
        against): use it where the process itself is under test (imports, memory, signals, two
        CLIs at once, daemons, state a test patched into this interpreter).
        """
        if not SUBPROCESS_ONLY:
            prepare_mlflow_store(self.root, args, env, input)
        fresh = self.subprocess if subprocess is None else subprocess
        if fresh or timeout is not None or SUBPROCESS_ONLY:
            return run_subprocess(self.root, args, input=input, env=env, timeout=timeout or 600)
        return run_in_process(self.root, args, input=input, env=env)

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


# --- Running the CLI: a fresh interpreter, or in this one -----------------------------------

# LLMOPS_TEST_SUBPROCESS=1: every `Project.run` starts `python -m llmops` and no prepared
# MLflow store is copied (the suite as it was; bench/suite_time.py times both).
SUBPROCESS_ONLY = os.environ.get("LLMOPS_TEST_SUBPROCESS") == "1"


def run_subprocess(root: Path, args, input: str | None = None, env: dict | None = None,
                   timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m llmops ARGS` in ROOT, output captured as text."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "llmops", *args],
        cwd=root,
        input=input,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def run_in_process(root: Path, args, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`llmops.cli.main.main(ARGS)` in this interpreter, as a subprocess would see it: cwd ROOT,
    ENV over os.environ, INPUT on stdin, non-tty stdout/stderr captured apart, SystemExit's code
    as returncode, an exception that escapes main as returncode 1 with its traceback on stderr,
    warnings and log records printed to stderr as an interpreter without pytest would. Everything
    it changed is restored afterwards, and the per-process caches a fresh interpreter would start
    without are emptied (`_reset_process_state`)."""
    import io
    import logging
    import traceback
    import warnings

    from llmops.cli.main import main

    out, err = io.BytesIO(), io.BytesIO()
    saved_streams = sys.stdin, sys.stdout, sys.stderr
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    root_logger = logging.getLogger()
    saved_handlers, saved_level = root_logger.handlers[:], root_logger.level
    # A subprocess gets stdin from `input` (or the parent's, which under pytest is empty).
    streams = (io.TextIOWrapper(io.BytesIO((input or "").encode()), encoding="utf-8"),
               io.TextIOWrapper(out, encoding="utf-8", write_through=True),
               io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace", write_through=True))
    sys.stdin, sys.stdout, sys.stderr = streams
    code: int = 0
    try:
        os.environ.update(env or {})
        os.chdir(root)
        # No pytest handlers on the root logger: WARNING records reach stderr via logging's
        # last-resort handler, as in a fresh interpreter.
        root_logger.handlers = []
        root_logger.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            _interpreter_warning_filters(warnings)
            try:
                main(list(args))
            except SystemExit as exc:
                if exc.code is None:
                    code = 0
                elif isinstance(exc.code, int):
                    code = exc.code
                else:  # sys.exit("message"): printed to stderr, status 1
                    print(exc.code, file=sys.stderr)
                    code = 1
            except BaseException:  # noqa: BLE001 - as the interpreter would: traceback, status 1
                traceback.print_exc()
                code = 1
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved_streams
        for stream in streams:
            stream.flush()
            stream.detach()  # the buffers outlive their wrappers (a wrapper closes it when collected)
        root_logger.handlers = saved_handlers
        root_logger.setLevel(saved_level)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        _reset_process_state()
    return subprocess.CompletedProcess(
        [sys.executable, "-m", "llmops", *args], code, _text(out.getvalue()), _text(err.getvalue())
    )


def _text(data: bytes) -> str:
    """Bytes decoded as `subprocess.run(text=True)` does (universal newlines)."""
    return data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")


def _interpreter_warning_filters(warnings) -> None:
    """Inside `catch_warnings`: the filters and printing of a plain `python` (pytest records
    warnings and turns some into errors; a subprocess prints them to stderr)."""
    warnings.resetwarnings()
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category)

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show


def _reset_process_state() -> None:
    """Empty the caches that live as long as the process, so each in-process CLI call starts as
    a fresh interpreter would: llmops' "store already checked / server already reachable" sets
    (a test may delete or replace a store between calls) and MLflow's store objects and
    engines, cached per URI (one would keep a SQLite database open after a test removed its
    file)."""
    mlflow_helpers = sys.modules.get("llmops.integrations.mlflow")
    if mlflow_helpers is not None:
        for name in ("_CHECKED", "_REACHABLE"):
            getattr(mlflow_helpers, name).clear()
    tracking = sys.modules.get("mlflow.tracking._tracking_service.registry")
    if tracking is not None:
        tracking.TrackingStoreRegistry._get_store_with_resolved_uri.cache_clear()
    registry = sys.modules.get("mlflow.tracking._model_registry.registry")
    if registry is not None:
        registry.ModelRegistryStoreRegistry._get_store_with_resolved_uri.cache_clear()
    # And their SQLAlchemy engines, kept per database URI by class: a pooled connection keeps
    # reading a database file the test has deleted.
    for name in ("mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
                 "mlflow.store.jobs.sqlalchemy_store"):
        module = sys.modules.get(name)
        for store in list(vars(module).values()) if module else []:
            engines = vars(store).get("_engine_map") if isinstance(store, type) else None
            if isinstance(engines, dict) and "_engine_map_lock" in vars(store):
                with store._engine_map_lock:
                    for engine in engines.values():
                        engine.dispose()
                    engines.clear()


def prepare_mlflow_store(root: Path, args, env: dict | None, input: str | None = None) -> None:
    """Before `llmops apply` would create the embedded MLflow store: a copy of one prepared
    empty store instead (creating one runs MLflow's schema migrations: seconds per project).

    Only where the product would create exactly that store: an apply that goes ahead
    (`--auto-approve`, or "yes" typed at its prompt), `.llmops/mlflow.db` is missing,
    neither llmops.yaml nor the environment names a tracking or registry URI, and llmops.yaml
    declares a resource whose provider opens the tracking store before apply (one that
    mixes in `llmops.providers.tracking_store.TrackingStore`). The copy is the product's own empty store
    (`check_store`, run once per session) with its Default experiment's artifact location and
    times set as this project's apply would have set them. Stores the product creates itself
    stay covered where this does not apply (other commands, other URIs, LLMOPS_TEST_SUBPROCESS=1).
    """
    if not args or args[0] != "apply" or "--help" in args or "-h" in args:
        return
    if "--auto-approve" not in args and (input or "").strip().splitlines()[:1] != ["yes"]:
        return
    db = root / ".llmops" / "mlflow.db"
    config = root / "llmops.yaml"
    if db.exists() or not config.is_file():
        return
    merged_env = {**os.environ, **(env or {})}
    if merged_env.get("MLFLOW_TRACKING_URI") or merged_env.get("MLFLOW_REGISTRY_URI"):
        return
    text = config.read_text()
    if "tracking_uri" in text or "registry_uri" in text:
        return
    import yaml

    from llmops.providers import provider_class
    from llmops.providers.tracking_store import TrackingStore

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return
    if not isinstance(doc, dict):
        return
    kinds = [kind for kind, value in doc.items() if isinstance(value, dict) and value]
    classes = [provider_class(kind) for kind in kinds if isinstance(kind, str)]
    if not any(isinstance(cls, type) and issubclass(cls, TrackingStore) for cls in classes):
        return
    copy_prepared_mlflow_db(db, root.resolve() / "mlruns")


def dvc_cli(root: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m dvc ARGS` in ROOT, the project's interpreter first on PATH: DVC's own CLI in a
    process of its own, forked from the warm DVC interpreter (llmops.integrations.dvcrun, which
    tests/test_dvcrun.py holds to answering as `python -m dvc` does) instead of importing DVC
    again (about 1.5 s of CPU a command)."""
    from llmops.integrations import dvcrun

    full = {**os.environ, **(env or {}), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return dvcrun.run(root, list(args), full, timeout=timeout)


def copy_prepared_mlflow_db(db: Path, artifact_root: Path) -> Path:
    """An empty SQLite MLflow store at DB, as MLflow would create it there (schema at head, the
    Default experiment's artifacts under ARTIFACT_ROOT/0), copied from the one prepared per
    session instead of running MLflow's migrations again. For a test that opens a store at a
    path of its own (a training job's tracking URI, a registry of its own); the store is still
    real MLflow, opened by MLflow. Returns DB."""
    import shutil
    import sqlite3
    import time
    from contextlib import closing

    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f".{db.name}.template")
    shutil.copyfile(_mlflow_template(), tmp)
    now = int(time.time() * 1000)
    with closing(sqlite3.connect(tmp)) as conn, conn:
        conn.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                     "WHERE experiment_id = 0", (str(artifact_root / "0"), now, now))
    os.replace(tmp, db)
    return db


_TEMPLATE: list[Path] = []
# The folder where the xdist controller builds the session's template for all its workers.
_TEMPLATE_ENV = "LLMOPS_TEST_MLFLOW_TEMPLATE"
# Builds the template in argv[1]: argv[1]/ready once it is there, argv[1]/failed (why) if not.
_BUILD_TEMPLATE = r"""
import os, sys, traceback
from pathlib import Path
folder = Path(sys.argv[1])
try:
    from llmops.integrations.mlflow import check_store
    check_store(folder, {})
except BaseException:
    (folder / ".failed").write_text(traceback.format_exc())
    os.replace(folder / ".failed", folder / "failed")
else:
    os.replace(folder / ".llmops" / "mlflow.db", folder / "ready")
"""


def _build_template(folder: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _BUILD_TEMPLATE, str(folder)], cwd=folder,
                            env=dict(os.environ, MLFLOW_CONFIGURE_LOGGING="false"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pytest_configure(config):
    """Under xdist, the controller (idle once the workers run) builds the session's MLflow
    template in the background while the workers start and collect, for all of them."""
    if hasattr(config, "workerinput") or os.environ.get(_TEMPLATE_ENV) or not config.getoption("numprocesses", None):
        return
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="llmops-mlflow-template-"))
    config._llmops_template = (_build_template(folder), folder)
    os.environ[_TEMPLATE_ENV] = str(folder)  # the workers, started after this, inherit it


def pytest_unconfigure(config):
    held = getattr(config, "_llmops_template", None)
    if held is not None:
        import shutil

        build, folder = held
        build.kill()
        build.wait()
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop(_TEMPLATE_ENV, None)


def _mlflow_template() -> Path:
    """An empty embedded MLflow store made by llmops' own `check_store`, once per session (by
    the xdist controller for all workers, else by this process)."""
    if not _TEMPLATE:
        import time

        shared = os.environ.get(_TEMPLATE_ENV)
        if shared:
            folder = Path(shared)
        else:
            import atexit
            import shutil
            import tempfile

            folder = Path(tempfile.mkdtemp(prefix="llmops-mlflow-template-"))
            atexit.register(shutil.rmtree, folder, True)
            _build_template(folder).wait(timeout=300)
        deadline = time.monotonic() + 300
        while not (folder / "ready").is_file():
            if (folder / "failed").is_file():
                raise RuntimeError(f"building the session's MLflow template failed:\n{(folder / 'failed').read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the session's MLflow template was not built in {folder} in 300 s")
            time.sleep(0.05)
        _TEMPLATE.append(folder / "ready")
    return _TEMPLATE[0]


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """The Docker engine's host (`.ci/docker-setup.sh` starts one), or a skip saying why not."""
    from dockerd import ensure_docker, skip_reason

    host = ensure_docker()
    if host is None:
        pytest.skip(f"no Docker engine can run here: {skip_reason()}")
    return host


@pytest.fixture
def project(tmp_path: Path, request: pytest.FixtureRequest) -> Project:
    root = tmp_path / "proj"
    root.mkdir()
    return Project(root, subprocess=getattr(request.module, "CLI_SUBPROCESS", False))


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
# Files with slow tests selected go first, in SLOW_FIRST's order (their slow tests dominate a
# whole run); then the rest by NOT_SLOW_SECONDS, their non-slow tests' seconds in one
# `-m "not slow"` run on this 2-core machine (2026-12-04; a file not listed counts as 0).
SLOW_FIRST = ("test_shared_state.py", "test_deploy_flow.py", "test_example.py", "test_secrets.py", "test_dpo.py",
              "test_self_healing.py", "test_serve_identity.py", "test_docker_serve.py", "test_mlflow_server.py",
              "test_init_apply.py", "test_approval_bypass.py", "test_monitor_flow.py", "test_apply_lock.py",
              "test_docker_finetune.py", "test_prompts_provider.py", "test_s3_stores.py", "test_mlflow_model.py",
              "test_finetunes_provider.py")
NOT_SLOW_SECONDS = {
    "test_train.py": 25.4, "test_apply_lock.py": 23.2, "test_hostile.py": 16.6, "test_self_healing.py": 15.9,
    "test_finetunes_provider.py": 13.9, "test_serve_identity.py": 13.0, "test_server.py": 10.3,
    "test_refresh_bulk.py": 9.7, "test_dvcrun.py": 9.6, "test_datasets_provider.py": 7.7, "test_serve_proxy.py": 7.2,
    "test_docker_serve.py": 6.8, "test_server_limits.py": 6.7, "test_cli_datasets.py": 6.6,
    "test_shared_state.py": 5.5, "test_docker_runner.py": 4.9, "test_wheel.py": 4.5, "test_init.py": 3.6,
    "test_engine.py": 3.0, "test_monitor_embedding.py": 2.9, "test_monitor_scale.py": 2.9, "test_github.py": 2.8,
    "test_prompts.py": 2.6, "test_docker_finetune.py": 2.5, "test_vllm.py": 2.4, "test_workflows.py": 2.3,
    "test_apply_scale.py": 2.0,
}


@pytest.hookimpl(trylast=True)  # after `-m` has deselected: order what will run
def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    with_slow = {item.path.name for item in items if item.get_closest_marker("slow")}

    def key(item):
        name = item.path.name
        if name in with_slow:
            return (0, rank.get(name, len(SLOW_FIRST)), 0.0)
        return (1, 0, -NOT_SLOW_SECONDS.get(name, 0.0))

    items.sort(key=key)
