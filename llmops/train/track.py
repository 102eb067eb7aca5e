"""MLflow logging from inside a training job: runs, buffered step metrics, artifacts, the model.

`Tracker` is a thin layer over `MlflowClient` (never the fluent `mlflow.start_run`
globals); step metrics are buffered and sent with `log_batch` so a long run does not
pay one database round trip per step. With no tracking URI every method is a no-op.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from llmops import tracking

FLUSH_EVERY = 25


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """{"training.learning_rate": "0.0002", ...} for MLflow params (values as strings, <= 500 chars)."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in sorted(value.items()):
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: str(value)[:500]}


class Tracker:
    def __init__(self, uri: str | None, registry_uri: str | None = None) -> None:
        self.client = tracking.make_client(uri, registry_uri) if uri else None
        self._pending: dict[str, list[Any]] = {}

    def experiment(self, name: str, artifacts: str | None) -> str | None:
        if self.client is None:
            return None
        return tracking.ensure_experiment(self.client, name, artifacts)

    def start(self, experiment_id: str | None, run_name: str, tags: dict[str, str], run_id: str | None = None) -> str:
        """A new run, or `run_id` reopened when it still exists (a resumed job)."""
        if self.client is None:
            return ""
        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            except Exception:  # deleted or from another store: start afresh
                pass
        run = self.client.create_run(experiment_id, tags=tags, run_name=run_name)
        return run.info.run_id

    def params(self, run_id: str, params: dict[str, str]) -> None:
        if self.client is None or not params:
            return
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for s in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[s : s + 100])

    def tags(self, run_id: str, tags: dict[str, str]) -> None:
        if self.client is None or not tags:
            return
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def metric(self, run_id: str, key: str, value: float | None, step: int = 0) -> None:
        if self.client is None or value is None:
            return
        from mlflow.entities import Metric

        self._pending.setdefault(run_id, []).append(Metric(key, float(value), int(time.time() * 1000), int(step)))
        if len(self._pending[run_id]) >= FLUSH_EVERY:
            self.flush(run_id)

    def metrics(self, run_id: str, values: dict[str, float | None], step: int = 0) -> None:
        for key, value in values.items():
            self.metric(run_id, key, value, step)

    def flush(self, run_id: str | None = None) -> None:
        if self.client is None:
            return
        for rid in [run_id] if run_id else list(self._pending):
            batch = self._pending.pop(rid, [])
            for s in range(0, len(batch), 500):
                self.client.log_batch(rid, metrics=batch[s : s + 500])

    def artifacts(self, run_id: str, folder: Path, artifact_path: str) -> None:
        if self.client is not None:
            self.client.log_artifacts(run_id, str(folder), artifact_path)

    def log_model(self, run_id: str, artifact_path: str, save: Callable[[Path], Any], scratch: Path) -> bool:
        """Write an MLflow model with `save(folder)` and log it as the run's `artifact_path`.

        The folder goes to the run's own artifact store (not an MLflow 3 LoggedModel), so
        `download_artifacts(run_id, artifact_path)` finds it through any tracking server and
        registering `runs:/RUN/artifact_path` points at it. `scratch` holds the temp folder
        (beside the job's outputs, not /tmp: a bundled base model can be large). False
        without tracking: nothing is written.
        """
        if self.client is None:
            return False
        Path(scratch).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".mlflow-model-", dir=scratch) as tmp:
            folder = Path(tmp) / artifact_path
            save(folder)
            self.client.log_artifacts(run_id, str(folder), artifact_path)
        return True

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        if self.client is None or not run_id:
            return
        self.flush(run_id)
        self.client.set_terminated(run_id, status=status)

    def register(self, model_name: str, run_id: str, artifact_path: str, tags: dict[str, str]) -> str | None:
        if self.client is None:
            return None
        return tracking.register_version(self.client, model_name, run_id, artifact_path, tags)
