"""The finetunes provider: trains a LoRA/QLoRA adapter as a job on a runner.

Apply writes the job spec (`.llmops/runs/finetunes/NAME/<fingerprint[:12]>/job.json`),
runs `python -m llmops.train` on the resource's runner, turns the job's JSON progress
lines into progress events and records the job's result: MLflow run, registered model
version, adapter/tokenizer hashes and metrics. A failed or killed job raises
ProviderError with the log's tail; applying again resumes from the job's newest
checkpoint (same fingerprint, same folder). Nothing heavy is imported here.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import llmops
from llmops.integrations import mlflow as tracking
from llmops.errors import ProviderError
from llmops.hashing import folder_sha256, sha256_json
from llmops.engine.lockfile import LockedResource
from llmops.evals.metrics import round_metric
from llmops.providers.base import ApplyRequest, ApplyResult, Drift, Found, ProgressEvent, Provider, short_number
from llmops.providers.tracking_store import TrackingStore
from llmops.train import spec as specs

JOB_MODULE = "llmops.train"
# The training metrics a fine-tune records in the lock (read back from its run on restore).
_RESULT_METRICS = ("train_loss", "eval_loss", "steps", "tokens_per_s", "peak_memory_mb", "train_runtime_s")


class FinetunesProvider(TrackingStore, Provider):
    kind = "finetunes"
    heavy_modules = ("mlflow",)

    @classmethod
    def summary(cls, outputs: dict[str, Any]) -> str:
        if not outputs.get("model_name"):
            return ""
        metrics = outputs.get("metrics") or {}
        losses = ", ".join(f"{k} {short_number(metrics[k])}" for k in ("train_loss", "eval_loss") if k in metrics)
        return f"registered {outputs['model_name']} v{outputs.get('model_version')}" + (f"; {losses}" if losses else "")

    def file_inputs(self, name: str, spec: dict[str, Any]) -> list[str]:
        prompt = self.ctx.spec_of(f"prompts.{spec.get('prompt', '')}")
        return [prompt["template"]] if prompt.get("template") else []

    def describe(self, name: str, spec: dict[str, Any], locked: LockedResource | None) -> dict[str, Any]:
        return {"trials": len(specs.expand_sweep(spec.get("sweep")))}

    def estimate(self, name: str, spec: dict[str, Any], locked: LockedResource | None,
                 upstream: dict[str, LockedResource | None]) -> dict[str, Any] | None:
        from llmops.engine.cost import estimate_finetune

        dataset = upstream.get(f"datasets.{spec.get('dataset')}")
        source = self.ctx.spec_of(f"datasets.{spec.get('dataset')}").get("source")
        try:
            training = specs.resolve_training(spec.get("training"))
            then = specs.resolve_training((locked.spec or {}).get("training")) if locked else None
        except ProviderError:
            return None  # apply reports the bad setting
        gpus = int((spec.get("resources") or {}).get("gpus") or 0)
        return estimate_finetune(self.ctx.root, training, len(specs.expand_sweep(spec.get("sweep"))), gpus,
                                 locked.outputs if locked else None, then,
                                 dataset.outputs if dataset else None, source if isinstance(source, str) else None)

    def refresh(self, name: str, spec: dict[str, Any], locked: LockedResource) -> list[Drift]:
        """The run and the registered version the lock names must still be in the stores (a
        deleted local MLflow database loses both), and the adapter here or fetchable from the run."""
        out = locked.outputs or {}
        adapter = out.get("adapter") or {}
        if not adapter.get("path"):
            return []
        lost = self._lost(out)
        if lost:
            return [Drift(f"{lost}: it will be trained again (and what uses it re-evaluated and promoted)",
                          code="missing")]
        weights = self.ctx.root / adapter["path"] / "adapter_model.safetensors"
        if weights.is_file():
            return []
        run_id = out.get("run_id")
        held = self._run_holds_model(str(run_id)) if run_id else None
        if held:
            return [Drift(f"adapter {adapter['path']} is missing here; {held} holds it: it will be fetched and "
                          "its sha256 verified, not trained", "restore", "missing")]
        return [Drift(f"adapter {adapter['path']} is missing and MLflow run {run_id} holds no `model` artifact; "
                      "it will be trained again", code="missing")]

    def _lost(self, out: dict[str, Any]) -> str | None:
        """Why the lock's MLflow run or registered version is gone from its store, or None."""
        if self._live_ok(out):
            return None
        c = tracking.client(self.ctx.root, self.ctx.settings)
        if out.get("run_id"):
            lost = tracking.lost_run(c, str(out["run_id"]), tracking.tracking_uri(self.ctx.root, self.ctx.settings))
            if lost:
                return f"MLflow {lost}"
        if out.get("model_name") and out.get("model_version"):
            return tracking.lost_model_version(c, str(out["model_name"]), str(out["model_version"]),
                                               tracking.registry_uri(self.ctx.root, self.ctx.settings))
        return None

    def _live_ok(self, out: dict[str, Any]) -> bool:
        """Whether the bulk reads of this plan (one search for the runs, one for the registered
        versions of every fine-tune the lock holds) show the run and the version are there."""
        def outs() -> list[dict[str, Any]]:
            return [locked.outputs or {} for _, _, locked in self.refreshing]

        def connect() -> Any:
            return tracking.client(self.ctx.root, self.ctx.settings)

        def runs() -> dict[str, str] | None:
            return tracking.bulk_runs(connect, [str(o["run_id"]) for o in outs() if o.get("run_id")],
                                      uri=tracking.tracking_uri(self.ctx.root, self.ctx.settings))

        def versions() -> set[tuple[str, str]] | None:
            return tracking.bulk_model_versions(connect, [str(o["model_name"]) for o in outs() if o.get("model_name")],
                                                uri=tracking.registry_uri(self.ctx.root, self.ctx.settings))

        if out.get("run_id"):
            live = self.bulk("runs", runs)
            if live is None or live.get(str(out["run_id"])) != "active":
                return False
        if out.get("model_name") and out.get("model_version"):
            held = self.bulk("versions", versions)
            if held is None or (str(out["model_name"]), str(out["model_version"])) not in held:
                return False
        return True

    def _run_holds_model(self, run_id: str) -> str | None:
        """"MLflow run R at URI" when the tracking store has run R with its `model` artifact."""
        from llmops.integrations.mlflow import client, display_uri, tracking_uri

        try:
            c = client(self.ctx.root, self.ctx.settings)
            names = {a.path.rsplit("/", 1)[-1] for a in c.list_artifacts(run_id)}
        except Exception:  # noqa: BLE001 - the run's artifacts are gone, or their store is unreachable
            return None
        if "model" not in names:
            return None
        return f"MLflow run {run_id} at {display_uri(tracking_uri(self.ctx.root, self.ctx.settings))}"

    def find_existing(self, name: str, spec: dict[str, Any], fingerprint: str) -> Found | None:
        """A version of this fine-tune's registered model trained for exactly this fingerprint
        (by a pull request's CI job, or another checkout): reused, never trained twice."""
        version = self._registered_version(name, fingerprint)
        if version is None:
            return None
        return Found(f"version {version['model_version']} of {name} was trained for this fingerprint (MLflow run "
                     f"{version['run_id']}): it will be fetched and verified, not trained", version)

    def _registered_version(self, name: str, fingerprint: str) -> dict[str, Any] | None:
        """The newest registered version of model NAME tagged with this fingerprint, or None."""
        from llmops.integrations.mlflow import client, filter_value

        try:
            found = client(self.ctx.root, self.ctx.settings).search_model_versions(
                f"name = {filter_value(name)} and tags.`llmops.fingerprint` = {filter_value(fingerprint)}")
        except Exception:  # noqa: BLE001 - no such model yet, or the store is unreachable (apply checks it)
            return None
        ready = [v for v in found if str(getattr(v, "status", "READY")) == "READY" and v.run_id]
        if not ready:
            return None
        v = max(ready, key=lambda v: int(v.version))
        return {"model_name": name, "model_version": str(v.version), "run_id": v.run_id,
                "adapter_sha256": (v.tags or {}).get("llmops.adapter_sha256")}

    def _run_dir(self, name: str, fingerprint: str) -> Path:
        digest = fingerprint.split(":", 1)[-1]  # "sha256:abc..." -> "abc..."
        return self.ctx.state_dir / "runs" / "finetunes" / name / digest[:12]

    def apply(self, request: ApplyRequest) -> ApplyResult:
        spec, name = request.spec, request.name
        addr = request.address
        self._precheck(spec)
        run_dir = self._run_dir(name, request.fingerprint)
        forced = request.before is not None and request.before.fingerprint == request.fingerprint
        if not forced:
            # One fingerprint, one version: a plan made without refresh may not have seen it.
            existing = self._registered_version(name, request.fingerprint)
            if existing is not None:
                request.log(f"version {existing['model_version']} was trained for this fingerprint; "
                                   "reusing it, not training")
                return self._restore_found(request, existing)
        if forced and run_dir.exists():  # --replace of an unchanged resource: train afresh
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        dataset, base, prompt = self._upstreams(request)
        inputs = self._inputs(dataset, base)
        job_spec = self._job_spec(request, run_dir, dataset, base, prompt, inputs)
        job_path = run_dir / "job.json"
        job_path.write_text(json.dumps(job_spec, indent=2, sort_keys=True))

        from llmops.runners.base import Job
        from llmops.runners.select import get_runner

        resources = spec.get("resources") or {}
        job = Job(
            name=f"finetune-{name}",
            module=JOB_MODULE,
            args=[str(job_path)],
            workdir=self.ctx.root,
            log_path=run_dir / "train.log",
            env={"MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"},
            gpus=int(resources.get("gpus") or 0),
            image=resources.get("image"),
        )
        watcher = _ProgressWatcher(request)
        runner = get_runner(self.ctx.settings, spec, root=self.ctx.root)
        request.log(f"training with {type(runner).__name__}; log: {self._rel(job.log_path)}")
        started = time.monotonic()
        result = runner.run(job, watcher.on_line, request.cancelled)
        wall = time.monotonic() - started
        if result.exit_code != 0 or watcher.done is None:
            why = "was cancelled" if request.cancelled() else f"failed (exit code {result.exit_code})"
            raise ProviderError(
                f"{addr}: the training job {why}. Last lines of {self._rel(job.log_path)}:\n{result.log_tail}\n"
                "Fix the cause and run `llmops apply` again: training resumes from the last checkpoint."
            )
        if result.image_digest:
            inputs["image_digest"] = result.image_digest
        outputs = self._outputs(watcher.done, base)
        outputs["cost"] = self._actual_cost(watcher, wall, job.gpus, dataset)
        return ApplyResult(outputs=outputs, inputs=inputs)

    @staticmethod
    def _actual_cost(watcher: "_ProgressWatcher", wall: float, gpus: int, dataset: dict[str, Any]) -> dict[str, Any]:
        """What the training job cost: every trial's tokens and training seconds, the job's wall
        time (start, imports and registering included), what `estimate` scales next time."""
        from llmops.engine.cost import actual

        done = watcher.done or {}
        trials = int(done.get("trials") or 1)  # a sweep reports its best trial: the others ran alike
        m = done.get("metrics") or {}
        tokens = int(m.get("tokens") or 0) * trials
        train_s = float(m.get("train_runtime_s") or 0) * trials
        return actual(watcher.device, wall, tokens=tokens or None, train_s=train_s or None, gpus=gpus,
                      train_rows=(dataset.get("train") or {}).get("rows"), trials=trials,
                      steps=int(m.get("steps") or 0) or None)

    def restore(self, request: ApplyRequest) -> ApplyResult:
        """Fetch the adapter and tokenizer from the MLflow run that trained them (the lock's,
        or the version found for this fingerprint) and verify the adapter's sha256."""
        found = request.private.get("found")
        if found:
            return self._restore_found(request, found)
        before = request.before
        if before is None or not before.outputs.get("run_id"):
            raise ProviderError(f"{request.address}: llmops.lock records no MLflow run to restore from; "
                                f"run `llmops apply --replace {request.address}` to train it.")
        out = before.outputs
        self._fetch(request, str(out["run_id"]), self.ctx.root / Path(out["adapter"]["path"]).parent,
                    str(out["adapter"]["sha256"]))
        return ApplyResult(outputs=dict(out), inputs=dict(before.inputs))

    def _restore_found(self, request: ApplyRequest, found: dict[str, Any]) -> ApplyResult:
        """Outputs of the registered version `found` (see `_registered_version`), fetched here."""
        from llmops.integrations.mlflow import client

        dataset, base, _prompt = self._upstreams(request)
        run_id = str(found["run_id"])
        model_dir = self._run_dir(request.name, request.fingerprint) / "model"
        expected = found.get("adapter_sha256")
        if not expected:
            raise ProviderError(f"{request.address}: version {found.get('model_version')} has no "
                                "llmops.adapter_sha256 tag to verify against; run `llmops apply --replace "
                                f"{request.address}` to train it again.")
        paths = self._fetch(request, run_id, model_dir, str(expected))
        run = client(self.ctx.root, self.ctx.settings).get_run(run_id)
        metrics = {k: round_metric(v) for k, v in run.data.metrics.items() if k in _RESULT_METRICS}
        tokenizer_sha = folder_sha256(paths["tokenizer"])
        outputs = {
            "run_id": run_id,
            "model_name": found.get("model_name") or request.name,
            "model_version": str(found["model_version"]),
            "adapter": {"path": self._rel(paths["adapter"]), "sha256": str(expected)},
            "tokenizer": {"path": self._rel(paths["tokenizer"]), "sha256": tokenizer_sha},
            "tokenizer_sha256": tokenizer_sha,
            "base_model": {"path": base["path"]},
            "metrics": metrics,
        }
        return ApplyResult(outputs=outputs, inputs=self._inputs(dataset, base))

    def _fetch(self, request: ApplyRequest, run_id: str, model_dir: Path, adapter_sha256: str) -> dict[str, Path]:
        """The run's adapter and tokenizer in `model_dir`, the adapter verified against `adapter_sha256`."""
        from llmops.integrations.mlflow import client
        from llmops.train.mlflow_model import fetch_model

        request.progress(ProgressEvent(message=f"fetching the adapter of MLflow run {run_id}"))
        paths = fetch_model(client(self.ctx.root, self.ctx.settings), run_id, model_dir, adapter_sha256)
        request.log(f"restored the adapter from MLflow run {run_id} (sha256 verified)")
        return {k: Path(v) for k, v in paths.items()}

    def delete(self, name: str, locked: LockedResource) -> None:
        """Remove the fine-tune's local files; MLflow runs and model versions stay as history."""
        shutil.rmtree(self.ctx.state_dir / "runs" / "finetunes" / name, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------

    def _upstreams(self, request: ApplyRequest) -> tuple[dict, dict, dict]:
        spec = request.spec

        def upstream(kind: str, ref: str) -> dict[str, Any]:
            entry = request.upstream.get(f"{kind}.{ref}")
            if entry is None:
                raise ProviderError(
                    f"{request.address}: upstream {kind}.{ref} has not been applied; "
                    f"run `llmops apply --select {request.address}` to apply it first."
                )
            return entry.outputs or {}

        dataset = upstream("datasets", spec["dataset"])
        if not (dataset.get("train") or {}).get("path"):
            raise ProviderError(
                f"{request.address}: datasets.{spec['dataset']} has no train split output; re-apply the dataset."
            )
        base = upstream("base_models", spec["base_model"])
        if not base.get("path"):
            raise ProviderError(f"{request.address}: base_models.{spec['base_model']} has no model folder recorded.")
        prompt = dict(request.upstream_specs.get(f"prompts.{spec['prompt']}") or {})
        if not prompt:
            raise ProviderError(f"{request.address}: prompts.{spec['prompt']} is not in llmops.yaml; add it.")
        return dataset, base, prompt

    def _inputs(self, dataset: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        inputs: dict[str, Any] = {
            "dataset_md5": {s: dataset[s]["md5"] for s in ("train", "eval") if (dataset.get(s) or {}).get("md5")}
        }
        if base.get("commit"):
            inputs["base_model_commit"] = base["commit"]
        if base.get("files"):
            inputs["base_model_files_sha"] = sha256_json(base["files"], ensure_ascii=True, compact=False)
        return inputs

    def _prompt_section(self, prompt: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"response_field": prompt.get("response_field") or "answer"}
        if prompt.get("template"):
            path = self.ctx.path(prompt["template"])
            try:
                out["text"] = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ProviderError(f"{prompt['template']}: cannot read the prompt template ({exc}); fix the path.")
        elif prompt.get("chat"):
            out["chat"] = prompt["chat"]
        else:
            out["text"] = prompt.get("text") or ""
        return out

    def _job_spec(
        self,
        request: ApplyRequest,
        run_dir: Path,
        dataset: dict[str, Any],
        base: dict[str, Any],
        prompt: dict[str, Any],
        inputs: dict[str, Any],
    ) -> dict[str, Any]:
        spec, root = request.spec, self.ctx.root
        uri = tracking.tracking_uri(root, self.ctx.settings)
        tags = {
            "llmops.address": request.address,
            "llmops.fingerprint": request.fingerprint,
            "llmops.version": llmops.__version__,
            "llmops.base_model": spec["base_model"],
            "llmops.dataset": spec["dataset"],
            "llmops.prompt": spec["prompt"],
        }
        for split, md5 in inputs["dataset_md5"].items():
            tags[f"llmops.dataset.{split}_md5"] = md5
        for key in ("base_model_commit", "base_model_files_sha"):
            if key in inputs:
                tags[f"llmops.{key}"] = inputs[key]
        base_entry = request.upstream.get(f"base_models.{spec['base_model']}")
        if base_entry is not None:
            tags["llmops.base_model.source"] = str(base.get("source") or "")
            tags["llmops.base_model.fingerprint"] = base_entry.fingerprint
        prompt_entry = request.upstream.get(f"prompts.{spec['prompt']}")
        if prompt_entry is not None:  # the registered prompt version the model was trained with
            for key in ("version", "digest", "uri"):
                if prompt_entry.outputs.get(key) is not None:
                    tags[f"llmops.prompt.{key}"] = str(prompt_entry.outputs[key])
        tags.update(tracking.git_state(root))
        eval_split = dataset.get("eval") or {}
        job: dict[str, Any] = {}
        if base.get("source") == "hf" and base.get("commit") and base_entry is not None:
            # The registered MLflow model names its base portably (repo + commit), not by folder.
            job["base_model_ref"] = {"hf": str(base_entry.inputs.get("hf")), "commit": str(base["commit"])}
        return {
            **job,
            "name": request.name,
            "method": str(spec.get("method") or "sft"),
            "base_model": str((root / base["path"]).resolve()),
            "train_path": str((root / dataset["train"]["path"]).resolve()),
            "eval_path": str((root / eval_split["path"]).resolve()) if eval_split.get("path") else None,
            "prompt": self._prompt_section(prompt),
            "adapter": specs.resolve_adapter(spec.get("adapter")),
            "training": specs.resolve_training(spec.get("training")),
            "export": spec.get("export") or {},
            "sweep": spec.get("sweep") or None,
            "select": specs.resolve_select(spec.get("select")),
            "output_dir": str(run_dir),
            "checkpoint_dir": str(run_dir / "checkpoints"),
            "tracking_uri": uri,
            "registry_uri": tracking.registry_uri(root, self.ctx.settings),
            "artifact_location": tracking.artifact_location(root) if tracking.is_local(uri) else None,
            "experiment": self.ctx.project_name,
            "registered_model": request.name,
            "tags": tags,
            "params": {"base_model": spec["base_model"], "dataset": spec["dataset"], "prompt": spec["prompt"],
                       "method": str(spec.get("method") or "sft")},
        }

    def _precheck(self, spec: dict[str, Any]) -> None:
        from llmops.runners.select import runner_name

        adapter = specs.resolve_adapter(spec.get("adapter"))
        if adapter["type"] == "qlora" and runner_name(self.ctx.settings, spec) == "local":
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                raise ProviderError(
                    "adapter.type qlora needs the bitsandbytes package and a CUDA GPU, and bitsandbytes is not "
                    "installed here; `pip install bitsandbytes` on a GPU machine or use adapter.type: lora."
                )

    def _rel(self, path: str | Path) -> str:
        p = Path(path)
        try:
            return p.resolve().relative_to(self.ctx.root.resolve()).as_posix()
        except ValueError:
            return str(p)

    def _outputs(self, done: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "run_id": done.get("run_id"),
            "model_name": done.get("model_name"),
            "model_version": done.get("model_version"),
            "adapter": {"path": self._rel(done["adapter"]["path"]), "sha256": done["adapter"]["sha256"]},
            "tokenizer": {"path": self._rel(done["tokenizer"]["path"]), "sha256": done["tokenizer"]["sha256"]},
            "tokenizer_sha256": done["tokenizer"]["sha256"],
            "base_model": {"path": base["path"]},
            "metrics": {k: round_metric(v) for k, v in (done.get("metrics") or {}).items() if v is not None},
        }
        if done.get("merged"):
            out["merged"] = {"path": self._rel(done["merged"]["path"]), "sha256": done["merged"]["sha256"]}
        if done.get("best_trial"):
            out["best_trial"] = done["best_trial"]
            out["trials"] = done.get("trials")
        return {k: v for k, v in out.items() if v is not None}


class _ProgressWatcher:
    """Turns the job's JSON lines into progress events; keeps the `done` event."""

    def __init__(self, request: ApplyRequest) -> None:
        self.request = request
        self.done: dict[str, Any] | None = None
        self.trials = 1
        self.trial = 0
        self.device = "cpu"

    def on_line(self, line: str) -> None:
        if not line.startswith("{"):
            return
        try:
            event = json.loads(line)
        except ValueError:
            return
        kind = event.get("event")
        if kind == "start":
            self.trials = int(event.get("trials") or 1)
            self.device = str(event.get("device") or "cpu")
        elif kind == "trial":
            self.trial = int(event.get("trial") or 0)
        elif kind == "step":
            where = f"trial {self.trial + 1}/{self.trials} " if self.trials > 1 else ""
            self.request.progress(
                ProgressEvent(
                    completed=event.get("step"),
                    total=event.get("total"),
                    message=f"{where}step {event.get('step')}/{event.get('total')} loss {event.get('loss', 0):.4f}",
                )
            )
        elif kind == "resume":
            step = event.get("step")
            self.request.progress(ProgressEvent(step, event.get("total"), f"resumed at step {step}"))
        elif kind == "done":
            self.done = {k: v for k, v in event.items() if k != "event"}

