"""MLflow logging from inside a training job: runs, buffered step metrics, artifacts, the model.

The job process never imports mlflow. `Tracker` starts a helper process first thing
(`python -m llmops.train.track`), which imports mlflow and opens the tracking store while
the job imports torch and transformers, then carries out the job's calls in order, one JSON
object a line over a pipe. Importing mlflow and opening its store takes seconds, about as
long as the job's own imports; a thread could not take that off the critical path (an
import holds the GIL, so it would stall the training loop, and first imports of libraries
both sides share are not safe from two threads at once); another process can.

Step metrics are buffered and sent in batches without waiting for the helper (so a long run
pays no database round trip per step); an error there comes back with the next call that
waits. Every other call waits for its answer. With no tracking URI every method is a no-op
and no helper starts.

`MlflowLog` is the helper's side: a thin layer over `MlflowClient` (never the fluent
`mlflow.start_run` globals).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llmops.errors import LlmopsError, ProviderError

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
    """The job's side: each method is carried out by the helper process, in call order."""

    def __init__(self, uri: str | None, registry_uri: str | None = None) -> None:
        self.enabled = bool(uri)
        self._pending: dict[str, list[list[Any]]] = {}
        self._unread = 0  # answers of calls interrupted (SIGTERM) before they were read
        self._proc = _start_helper(str(uri), registry_uri) if uri else None

    def experiment(self, name: str, artifacts: str | None) -> str | None:
        return self._call("experiment", name, artifacts)

    def start(self, experiment_id: str | None, run_name: str, tags: dict[str, str], run_id: str | None = None) -> str:
        """A new run, or `run_id` reopened when it still exists (a resumed job)."""
        return self._call("start", experiment_id, run_name, tags, run_id) or ""

    def params(self, run_id: str, params: dict[str, str]) -> None:
        if params:
            self._call("params", run_id, params)

    def tags(self, run_id: str, tags: dict[str, str]) -> None:
        if tags:
            self._call("tags", run_id, {k: str(v) for k, v in tags.items()})

    def metric(self, run_id: str, key: str, value: float | None, step: int = 0) -> None:
        if self._proc is None or value is None:
            return
        self._pending.setdefault(run_id, []).append([key, float(value), int(time.time() * 1000), int(step)])
        if len(self._pending[run_id]) >= FLUSH_EVERY:
            self.flush(run_id)

    def metrics(self, run_id: str, values: dict[str, float | None], step: int = 0) -> None:
        for key, value in values.items():
            self.metric(run_id, key, value, step)

    def flush(self, run_id: str | None = None) -> None:
        for rid in [run_id] if run_id else list(self._pending):
            batch = self._pending.pop(rid, [])
            if batch:
                self._call("metrics", rid, batch, wait=False)

    def artifacts(self, run_id: str, folder: Path, artifact_path: str) -> None:
        self._call("artifacts", run_id, str(folder), artifact_path)

    def log_model(self, run_id: str, artifact_path: str, model: dict[str, Any], scratch: Path) -> bool:
        """Write the pyfunc model (llmops.train.mlflow_model.save_model with `model`'s
        `adapter_dir`, `tokenizer_dir` and `base`) and log it as the run's `artifact_path`.

        The folder goes to the run's own artifact store (not an MLflow 3 LoggedModel), so
        `download_artifacts(run_id, artifact_path)` finds it through any tracking server and
        registering `runs:/RUN/artifact_path` points at it. `scratch` holds the temp folder
        (beside the job's outputs, not /tmp: a bundled base model can be large). False
        without tracking: nothing is written.
        """
        if self._proc is None:
            return False
        model = {"adapter_dir": str(model["adapter_dir"]), "tokenizer_dir": str(model["tokenizer_dir"]),
                 "base": model["base"]}
        return bool(self._call("log_model", run_id, artifact_path, model, str(scratch)))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        if self._proc is None or not run_id:
            return
        self.flush(run_id)
        self._call("end", run_id, status)

    def register(self, model_name: str, run_id: str, artifact_path: str, tags: dict[str, str]) -> str | None:
        return self._call("register", model_name, run_id, artifact_path, tags)

    def close(self) -> None:
        """Send what is buffered, let the helper finish its work and exit."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            for rid, batch in self._pending.items():
                if batch:
                    _send(proc, {"op": "metrics", "args": [rid, batch], "wait": False})
            _send(proc, {"op": "close", "args": [], "wait": False})
            assert proc.stdin is not None
            proc.stdin.close()
        except OSError:
            pass
        self._pending.clear()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def _call(self, op: str, *args: Any, wait: bool = True) -> Any:
        proc = self._proc
        if proc is None:
            return None
        assert proc.stdout is not None
        try:
            _send(proc, {"op": op, "args": list(args), "wait": wait})
            if not wait:
                return None
            self._unread += 1  # this call's answer, after those of calls interrupted before
            while self._unread > 1 and proc.stdout.readline():
                self._unread -= 1
            reply = proc.stdout.readline()
            self._unread = 0
        except OSError:
            reply = ""
        if not reply:
            code = proc.poll()
            raise ProviderError(
                f"the training job's MLflow helper process stopped (exit code {code}) during `{op}`; "
                "its error is in the job log above. Fix it and run the job again: it resumes."
            )
        answer = json.loads(reply)
        if "error" in answer:
            raise ProviderError(answer["error"])
        return answer.get("result")


def _send(proc: subprocess.Popen, message: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(message) + "\n")
    proc.stdin.flush()


def _start_helper(uri: str, registry_uri: str | None) -> subprocess.Popen:
    """`python -m llmops.train.track URI REGISTRY`, with this process's llmops first on its path."""
    import llmops

    here = str(Path(llmops.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": here + (os.pathsep + path if path else "")}
    return subprocess.Popen(
        [sys.executable, "-m", "llmops.train.track", uri, registry_uri or uri],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,  # the answers; the helper's own output goes to stderr (the job log)
        env=env,
        text=True,
        encoding="utf-8",
        bufsize=1,
    )


# -- the helper process ---------------------------------------------------------------------


class MlflowLog:
    """The helper's side of `Tracker`: the same calls, on an MlflowClient."""

    def __init__(self, uri: str, registry_uri: str | None = None) -> None:
        from llmops.integrations import mlflow as tracking

        self.client = tracking.make_client(uri, registry_uri)

    def warm_up(self) -> None:
        """Import what the calls will need and open the store, before the first call comes."""
        import mlflow.pyfunc  # noqa: F401 - save_model's imports
        import pandas  # noqa: F401
        from mlflow.entities import Metric  # noqa: F401
        from mlflow.models import Model  # noqa: F401

        try:
            self.client.search_experiments(max_results=1)
        except Exception:  # noqa: BLE001 - the first real call reports it, with its own message
            pass

    def experiment(self, name: str, artifacts: str | None) -> str:
        from llmops.integrations import mlflow as tracking

        return tracking.ensure_experiment(self.client, name, artifacts)

    def start(self, experiment_id: str | None, run_name: str, tags: dict[str, str], run_id: str | None) -> str:
        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            except Exception:  # noqa: BLE001 - deleted or from another store: start afresh
                pass
        run = self.client.create_run(experiment_id, tags=tags, run_name=run_name)
        return run.info.run_id

    def params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for s in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[s : s + 100])

    def tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def metrics(self, run_id: str, batch: list[list[Any]]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key, value, timestamp, step) for key, value, timestamp, step in batch]
        for s in range(0, len(metrics), 500):
            self.client.log_batch(run_id, metrics=metrics[s : s + 500])

    def artifacts(self, run_id: str, folder: str, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, folder, artifact_path)

    def log_model(self, run_id: str, artifact_path: str, model: dict[str, Any], scratch: str) -> bool:
        from llmops.train import mlflow_model

        Path(scratch).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".mlflow-model-", dir=scratch) as tmp:
            folder = Path(tmp) / artifact_path
            mlflow_model.save_model(folder, Path(model["adapter_dir"]), Path(model["tokenizer_dir"]), model["base"])
            self.client.log_artifacts(run_id, str(folder), artifact_path)
        return True

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    def register(self, model_name: str, run_id: str, artifact_path: str, tags: dict[str, str]) -> str:
        from llmops.integrations import mlflow as tracking

        return tracking.register_version(self.client, model_name, run_id, artifact_path, tags)


def serve(uri: str, registry_uri: str) -> int:
    """The helper's loop: read a call a line from stdin, answer those that wait on stdout.

    An error of a call that does not wait is answered to the next call that does (which is
    then not carried out), except a run's end as KILLED or FAILED: the job is already
    failing, and the run must still be closed.
    """
    import signal
    import traceback

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a cancelled job still ends its run through us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever mlflow prints goes to the job log, never among the answers
    log: MlflowLog | None = None
    failed: str | None = None
    try:
        log = MlflowLog(uri, registry_uri)
        log.warm_up()
    except Exception as exc:  # noqa: BLE001 - every call will answer it
        traceback.print_exc()
        failed = _describe(exc, "opening the tracking store")
    for line in sys.stdin:
        call = json.loads(line)
        op, args, wait = call["op"], call["args"], call["wait"]
        if op == "close":
            break
        cleanup = op == "end" and args[1] != "FINISHED"
        if failed is not None and not cleanup:
            if wait:
                _answer(answers, {"error": failed})
                failed = None if log is not None else failed
            continue
        try:
            if log is None:
                raise ProviderError(failed or "the tracking store could not be opened")
            result = getattr(log, op)(*args)
        except Exception as exc:  # noqa: BLE001 - handed back to the job
            traceback.print_exc()
            message = _describe(exc, f"MLflow `{op}`")
            if wait:
                _answer(answers, {"error": message})
            else:
                failed = failed or message
            continue
        if wait:
            _answer(answers, {"result": result})
    return 0


def _answer(answers: Any, message: dict[str, Any]) -> None:
    answers.write(json.dumps(message) + "\n")
    answers.flush()


def _describe(exc: BaseException, what: str) -> str:
    if isinstance(exc, LlmopsError):
        return exc.message
    return f"{what} failed: {type(exc).__name__}: {str(exc)[:500]} (the traceback is in the job log)"


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], sys.argv[2]))
