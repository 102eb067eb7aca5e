"""MLflow helpers shared by fine-tunes, evals and deployments.

The embedded default is `sqlite:///.llmops/mlflow.db` with artifacts under
`.llmops/mlartifacts`, both relative to the project; an `http(s)://` tracking server is
used as given. mlflow is imported inside the functions that need it (the CLI starts
without it) and telemetry is always off.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmops.errors import ProviderError

DEFAULT_TRACKING_URI = "sqlite:///.llmops/mlflow.db"
ARTIFACTS_DIR = ".llmops/mlartifacts"


def quiet_env() -> None:
    """Environment every MLflow user here sets first: no telemetry, no version nagging."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")


def resolve_uri(uri: str, root: Path) -> str:
    """`uri` with a relative sqlite or file path made absolute to `root` (its folder is created)."""
    root = Path(root).resolve()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = (root / uri[len("sqlite:///") :]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if uri.startswith("sqlite:////"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        return uri
    if "://" not in uri:  # a plain folder: MLflow's file store
        path = (root / uri).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path.as_uri()
    return uri


def display_uri(uri: str) -> str:
    """A tracking or registry URI as messages may show it (no password)."""
    from llmops.redact import redact_url

    return redact_url(uri)


def filter_value(value: str) -> str:
    """`value` quoted for an MLflow search filter (`tags.`k` = '...'`)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def is_local(uri: str) -> bool:
    """Whether runs of this tracking URI keep their artifacts on this machine by default."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def tracking_uri(root: Path, settings: dict[str, Any]) -> str:
    """The project's tracking URI (settings.tracking_uri or the embedded default), absolute."""
    Path(root, ".llmops").mkdir(parents=True, exist_ok=True)
    return resolve_uri(settings.get("tracking_uri") or DEFAULT_TRACKING_URI, root)


def registry_uri(root: Path, settings: dict[str, Any]) -> str:
    """settings.registry_uri, or the tracking URI."""
    if settings.get("registry_uri"):
        return resolve_uri(settings["registry_uri"], root)
    return tracking_uri(root, settings)


def artifact_location(root: Path) -> str:
    """Where experiments created on a local store keep artifacts: `.llmops/mlartifacts`."""
    path = (Path(root) / ARTIFACTS_DIR).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def make_client(uri: str, registry: str | None = None) -> Any:
    """An MlflowClient for explicit URIs (the training job, which has no settings dict)."""
    quiet_env()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=registry or uri)


def client(root: Path, settings: dict[str, Any]) -> Any:
    """An MlflowClient on the project's tracking and registry URIs."""
    return make_client(tracking_uri(root, settings), registry_uri(root, settings))


def check_store(root: Path, settings: dict[str, Any]) -> None:
    """Open the tracking store once, before parallel work: creates the embedded SQLite schema
    (two training jobs must not race to create it) and fails early, clearly, when a tracking
    server does not answer."""
    uri = tracking_uri(root, settings)
    if uri in _CHECKED:
        return
    check_reachable(uri)  # MLflow's own clients retry for minutes before giving up
    check_reachable(registry_uri(root, settings))
    try:
        client(root, settings).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for an unreachable store
        raise store_error(uri, exc) from exc
    _CHECKED.add(uri)


_CHECKED: set[str] = set()


def store_error(uri: str, exc: BaseException) -> ProviderError:
    """The error for a tracking store that cannot answer at all (as opposed to "not found")."""
    return ProviderError(
        f"cannot use the MLflow tracking store {display_uri(uri)} ({type(exc).__name__}: {str(exc)[:200]}); "
        "start the tracking server or fix settings.tracking_uri."
    )


def not_found(exc: BaseException) -> bool:
    """Whether an MLflow error says the run, model or version asked for is not in the store
    (a deleted local database comes back empty: everything is "not found"), rather than that
    the store could not answer."""
    return getattr(exc, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def lost_run(mlflow_client: Any, run_id: str, uri: str) -> str | None:
    """Why run `run_id` is unusable in the tracking store at `uri` (absent, e.g. the local
    database was deleted, or deleted by hand), or None when it is there. Raises ProviderError
    when the store cannot answer: that is not drift, and must not plan a rebuild."""
    try:
        run = mlflow_client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MlflowException, or a transport error of a dead server
        if not_found(exc):
            return f"run {run_id} is not in the tracking store {display_uri(uri)}"
        raise store_error(uri, exc) from exc
    if run.info.lifecycle_stage == "deleted":
        return f"run {run_id} was deleted from the tracking store {display_uri(uri)}"
    return None


def lost_model_version(mlflow_client: Any, name: str, version: str, uri: str) -> str | None:
    """Why version `version` of registered model `name` is unusable in the registry at `uri`,
    or None when it is there; ProviderError when the registry cannot answer."""
    try:
        mlflow_client.get_model_version(name, str(version))
    except Exception as exc:  # noqa: BLE001 - as in lost_run
        if not_found(exc):
            return f"registered model {name} v{version} is not in the model registry {display_uri(uri)}"
        raise store_error(uri, exc) from exc
    return None


_DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, naming the server, when a tracking server or a registry database
    does not accept connections: MLflow's own clients retry with backoff for minutes first
    (urllib3 for http(s), SQLAlchemy for `postgresql://`...). Local stores pass."""
    import socket
    from urllib.parse import urlsplit

    if uri in _REACHABLE:  # every MLflow-backed kind asks; one connection per process is enough
        return
    try:
        parts = urlsplit(uri)
        scheme = parts.scheme.split("+", 1)[0].lower()  # postgresql+psycopg -> postgresql
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        return  # not a URL MLflow accepts either: its own error names it
    if port is None or not parts.hostname:
        return  # sqlite, file, databricks... nothing to connect to here
    if scheme in ("http", "https"):
        what = f"MLflow tracking server {parts.scheme}://{parts.hostname}:{port}"
    else:
        what = f"{scheme} database of the MLflow store {display_uri(uri)} (port {port})"
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise ProviderError(
            f"cannot reach the {what} ({exc.strerror or exc}); "
            "start it or fix settings.tracking_uri / settings.registry_uri or MLFLOW_TRACKING_URI (or drop --target)."
        ) from None
    _REACHABLE.add(uri)


_REACHABLE: set[str] = set()


def ensure_experiment(mlflow_client: Any, name: str, artifacts: str | None = None) -> str:
    """The id of experiment `name`, created (with `artifacts` as its location) when missing."""
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifacts)
    except Exception:  # created concurrently by another resource of the same apply
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def register_version(
    mlflow_client: Any,
    model_name: str,
    run_id: str,
    artifact_path: str,
    tags: dict[str, str] | None = None,
    description: str = "",
) -> str:
    """Register `artifact_path` of run `run_id` as a new version of `model_name`; returns it.

    The registered model is created on first use; the version carries `tags` (lineage).
    """
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.get_registered_model(model_name)
    except MlflowException:
        try:
            mlflow_client.create_registered_model(model_name)
        except MlflowException:
            mlflow_client.get_registered_model(model_name)  # created concurrently; must exist now
    run = mlflow_client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    try:
        version = mlflow_client.create_model_version(
            name=model_name,
            source=source,
            run_id=run_id,
            tags={k: str(v) for k, v in (tags or {}).items()},
            description=description or None,
        )
    except MlflowException as exc:
        raise ProviderError(
            f"MLflow refused to register '{model_name}' from {source}: {exc.message}; check the tracking server."
        ) from exc
    return str(version.version)


_APPLY_WRITES = ("llmops.lock", "dvc.yaml", "dvc.lock", ".dvc", ".dvcignore")


def git_state(root: Path) -> dict[str, str]:
    """Lineage tags of the checkout holding `root`: `llmops.git_commit` (HEAD), `llmops.git_dirty`
    ("true" when the project folder has uncommitted changes, untracked files included, ignored
    ones not) and, when dirty, `llmops.git_diff_sha256`: the sha256 of `git diff HEAD` of the
    folder plus each untracked file's path and sha256, so two dirty trees can be told apart.
    What llmops itself writes while applying (llmops.lock, dvc.yaml, dvc.lock, .dvc/) does not
    count: the lock records it. Empty outside git or before a first commit."""
    import hashlib
    import subprocess

    commit = git_commit(root)
    if commit is None:
        return {}

    def git(*args: str) -> bytes | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    tags = {"llmops.git_commit": commit}
    where = ["--", ".", *(f":(exclude){p}" for p in _APPLY_WRITES)]
    status = git("status", "--porcelain", "--untracked-files=all", "-z", *where)
    if status is None:
        return tags
    tags["llmops.git_dirty"] = "true" if status else "false"
    if status:
        h = hashlib.sha256(git("diff", "HEAD", "--binary", *where) or b"")
        untracked = git("ls-files", "--others", "--exclude-standard", "-z", *where) or b""
        for rel in sorted(p for p in untracked.split(b"\0") if p):
            path = Path(root) / rel.decode("utf-8", "surrogateescape")
            h.update(b"\0untracked\0" + rel + b"\0")
            try:
                h.update(hashlib.sha256(path.read_bytes()).digest() if path.is_file() else b"")
            except OSError:
                pass
        tags["llmops.git_diff_sha256"] = h.hexdigest()
    return tags


def git_commit(root: Path) -> str | None:
    """HEAD of the git repository holding `root`, or None outside git / before a first commit."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


# --- Refresh in bulk ------------------------------------------------------------------------
#
# Plan's refresh used to ask the registry once per resource (a `get_*` per prompt alias, model
# version, run): thousands of round trips on a big project. These read what a whole kind needs
# in one search (names and run ids go `IN (...)` filters, BULK_CHUNK at a time). They answer
# only "known healthy"; a provider still asks about anything else one resource at a time, with
# the exact checks and messages it always had, so drift is found exactly as before. None means
# the store could not answer the search (then every resource is asked about singly).
#
# A local SQLite store (the embedded default) is read with the standard library instead, read
# only: loading MLflow and its SQLAlchemy store costs over a second before the first query,
# and its ORM another ~0.1 ms per entity, which made a refresh of a healthy project several
# times slower than the plan itself. Only the columns MLflow's own lookups decide by are read
# (alias -> version, a version's stage, a run's lifecycle stage), under the same rules (see
# `_sqlite_*`); a database whose tables lack them, or MLflow workspaces in use, goes through
# MLflow. `connect` is the MlflowClient, or a function making it (so the fast path never does).

BULK_CHUNK = 500
PROMPT_TAG = "mlflow.prompt.is_prompt"
_DELETED_VERSION = "Deleted_Internal"  # mlflow.entities.model_registry.model_version_stages
SQLITE_BULK = True  # tests turn it off to drive the MlflowClient path


def _chunks(values: list[str]) -> list[list[str]]:
    values = sorted(set(values))
    return [values[i:i + BULK_CHUNK] for i in range(0, len(values), BULK_CHUNK)]


def _in_list(values: list[str]) -> str:
    return "(" + ", ".join(filter_value(v) for v in values) + ")"


def _paged(search: Any, **kwargs: Any) -> list[Any]:
    out: list[Any] = []
    token = None
    while True:
        page = search(page_token=token, **kwargs)
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def _client_of(connect: Any) -> Any:
    return connect() if callable(connect) and not hasattr(connect, "search_registered_models") else connect


def _aliases(model: Any) -> dict[str, str]:
    raw = getattr(model, "aliases", None) or {}
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    return {str(a.alias): str(a.version) for a in raw}  # a list of RegisteredModelAlias


def bulk_aliases(connect: Any, names: list[str], prompts: bool = False,
                 uri: str | None = None) -> dict[str, dict[str, str]] | None:
    """{registered model (or prompt) name: {alias: version}} for those of `names` that exist.
    `uri`: the registry's URI (a local SQLite one is read directly)."""
    if not names:
        return {}
    fast = _sqlite_aliases(uri, names, prompts) if uri else None
    if fast is not None:
        return fast
    out: dict[str, dict[str, str]] = {}
    try:
        mlflow_client = _client_of(connect)
        for chunk in _chunks(names):
            where = f"name IN {_in_list(chunk)}"
            if prompts:  # naming the prompt tag stops MLflow from leaving prompts out
                where += f" AND tags.`{PROMPT_TAG}` = 'true'"
            for model in _paged(mlflow_client.search_registered_models, filter_string=where, max_results=1000):
                out[str(model.name)] = _aliases(model)
    except Exception:  # noqa: BLE001 - a store without IN filters, or a dead one: ask singly
        return None
    return out


def bulk_model_versions(connect: Any, names: list[str], uri: str | None = None) -> set[tuple[str, str]] | None:
    """{(registered model name, version)} of every version of `names` in the registry."""
    if not names:
        return set()
    fast = _sqlite_versions(uri, names) if uri else None
    if fast is not None:
        return fast
    out: set[tuple[str, str]] = set()
    try:
        mlflow_client = _client_of(connect)
        for chunk in _chunks(names):
            for mv in _paged(mlflow_client.search_model_versions, filter_string=f"name IN {_in_list(chunk)}",
                             max_results=10_000):
                out.add((str(mv.name), str(mv.version)))
    except Exception:  # noqa: BLE001 - as in bulk_aliases
        return None
    return out


def bulk_runs(connect: Any, run_ids: list[str], uri: str | None = None) -> dict[str, str] | None:
    """{run id: lifecycle stage} of those of `run_ids` in the tracking store (deleted ones too)."""
    if not run_ids:
        return {}
    fast = _sqlite_runs(uri, run_ids) if uri else None
    if fast is not None:
        return fast
    out: dict[str, str] = {}
    try:
        from mlflow.entities import ViewType

        mlflow_client = _client_of(connect)
        experiments = [e.experiment_id for e in _paged(mlflow_client.search_experiments,
                                                        view_type=ViewType.ALL, max_results=1000)]
        if not experiments:
            return out
        for chunk in _chunks(run_ids):
            for run in _paged(mlflow_client.search_runs, experiment_ids=experiments,
                              filter_string=f"attributes.run_id IN {_in_list(chunk)}",
                              run_view_type=ViewType.ALL, max_results=BULK_CHUNK):
                out[str(run.info.run_id)] = str(run.info.lifecycle_stage)
    except Exception:  # noqa: BLE001 - as in bulk_aliases
        return None
    return out


def _sqlite_rows(uri: str, tables: dict[str, set[str]], query: str, values: list[str]) -> list[tuple] | None:
    """Rows of `query` (its `{in}` is a `?` list) over `values` BULK_CHUNK at a time, on the
    SQLite database of `uri` opened read only; None when that is not a local SQLite store
    holding `tables` with these columns, MLflow workspaces are on, or the query fails."""
    import sqlite3
    from contextlib import closing
    from urllib.parse import quote

    if not SQLITE_BULK or not uri.startswith("sqlite:////"):
        return None
    if os.environ.get("MLFLOW_WORKSPACE") or os.environ.get("MLFLOW_ENABLE_WORKSPACES", "").lower() in ("1", "true"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if not Path(path).is_file():
        return None  # MLflow would create it; then nothing is in it
    try:
        with closing(sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, timeout=10)) as db:
            for table, columns in tables.items():
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if not columns <= have or ("workspace" in have) != ("workspace" in columns):
                    return None
            rows: list[tuple] = []
            for chunk in _chunks(values):
                sql = query.format(**{"in": ", ".join("?" * len(chunk))})
                rows.extend(db.execute(sql, chunk).fetchall())
        return rows
    except sqlite3.Error:
        return None


_WS = "workspace"  # MLflow 3.x registry tables carry one; only its 'default' is read here


def _sqlite_aliases(uri: str, names: list[str], prompts: bool) -> dict[str, dict[str, str]] | None:
    """As `bulk_aliases`: an alias counts when it points at a version that is not deleted, and
    the model is a prompt (`prompts`) or not one, as MLflow's search tells them apart."""
    is_prompt = ("EXISTS (SELECT 1 FROM registered_model_tags t WHERE t.workspace = 'default' AND t.name = m.name "
                 f"AND t.key = '{PROMPT_TAG}' AND t.value = 'true')")
    rows = _sqlite_rows(uri, {"registered_models": {"name", _WS}, "registered_model_aliases": {"name", "alias",
                              "version", _WS}, "model_versions": {"name", "version", "current_stage", _WS},
                              "registered_model_tags": {"name", "key", "value", _WS}},
                        "SELECT m.name, a.alias, a.version FROM registered_models m "
                        "LEFT JOIN registered_model_aliases a ON a.workspace = m.workspace AND a.name = m.name "
                        "AND EXISTS (SELECT 1 FROM model_versions v WHERE v.workspace = a.workspace "
                        f"AND v.name = a.name AND v.version = a.version AND COALESCE(v.current_stage, '') != '{_DELETED_VERSION}') "
                        "WHERE m.workspace = 'default' AND m.name IN ({in}) AND " + ("" if prompts else "NOT ")
                        + is_prompt, names)
    return None if rows is None else _grouped(rows)


def _grouped(rows: list[tuple]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for name, alias, version in rows:
        entry = out.setdefault(str(name), {})
        if alias is not None:
            entry[str(alias)] = str(version)
    return out


def _sqlite_versions(uri: str, names: list[str]) -> set[tuple[str, str]] | None:
    rows = _sqlite_rows(uri, {"model_versions": {"name", "version", "current_stage", _WS}},
                        "SELECT name, version FROM model_versions WHERE workspace = 'default' AND name IN ({in}) "
                        f"AND COALESCE(current_stage, '') != '{_DELETED_VERSION}'", names)
    return None if rows is None else {(str(n), str(v)) for n, v in rows}


def _sqlite_runs(uri: str, run_ids: list[str]) -> dict[str, str] | None:
    rows = _sqlite_rows(uri, {"runs": {"run_uuid", "lifecycle_stage"}},
                        "SELECT run_uuid, lifecycle_stage FROM runs WHERE run_uuid IN ({in})", run_ids)
    return None if rows is None else {str(r): str(stage) for r, stage in rows}
