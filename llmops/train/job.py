"""The training job: `python -m llmops.train SPEC_JSON`, run by a runner for one fine-tune.

It trains every trial of the fine-tune (one, or a sweep's grid, each a child MLflow
run), keeps the best by `select`, exports the adapter + tokenizer (and the merged model
when asked), logs them to the MLflow run as a pyfunc model (llmops.train.mlflow_model) and
registers that as a new model version with lineage tags. Progress goes to stdout as one
JSON object per line; logs go to stderr. State in `output_dir/state.json` lets a re-run
skip finished trials and resume the unfinished one from its newest checkpoint, inside the
same MLflow run. MLflow is never imported here: llmops.train.track's helper process does the
logging, and starts first, so that its imports run beside this process's torch imports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from llmops.errors import LlmopsError, ProviderError
from llmops.fsutil import atomic_write_text
from llmops.train import spec as specs
from llmops.train.mlflow_model import MODEL_ARTIFACT

MERGED_ARTIFACT = "merged"


def _is_main() -> bool:
    """Rank 0 (or the only process): the one that reports, tracks and writes state."""
    return int(os.environ.get("RANK", "0")) == 0


def emit(event: dict[str, Any]) -> None:
    if _is_main():
        sys.stdout.write(json.dumps(event, sort_keys=True) + "\n")
        sys.stdout.flush()


def log(message: str) -> None:
    sys.stderr.write(message.rstrip() + "\n")
    sys.stderr.flush()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        log("usage: python -m llmops.train SPEC_JSON")
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        job = specs.read_job_spec(Path(argv[0]))
        check_rows(job)  # a bad dataset fails in well under a second: before torch, MLflow or a run
        tracker = _tracker(job)  # first: its helper imports mlflow while this process imports torch
        _quiet_libraries()
        result = run_job(job, tracker)
    except KeyboardInterrupt:
        log("error: the training job was stopped; run it again to resume from the last checkpoint.")
        return 130
    except LlmopsError as exc:
        log(f"error: {exc.message}")
        return 1
    except Exception:
        log(traceback.format_exc())
        return 1
    if result is not None:
        emit({"event": "done", **result})
    return 0


def check_rows(job: dict[str, Any]) -> None:
    """Raise the error encoding would raise later when a row of the train or eval split lacks
    the prompt's response field or a field its template uses, or a line is not JSON; pure
    Python (jinja2), so no torch, tokenizer, MLflow helper or run is started for bad data.

    A preference (`method: dpo`) job skips it: it leaves out rows without both answers, and
    checks each pair's prompt as it encodes it.
    """
    from llmops.train.data import PromptRenderer, read_jsonl

    if str(job.get("method") or "sft") != "sft":
        return
    renderer = PromptRenderer(job.get("prompt") or {})  # chat: message templates only, no chat template
    for key in ("train_path", "eval_path"):
        if job.get(key):
            for row in read_jsonl(Path(job[key])):
                renderer.render(row)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _quiet_libraries() -> None:
    """No progress bars or deprecation chatter in the job log: its tail is the error report."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


class _State:
    """output_dir/state.json: the MLflow run ids and finished trials of this fingerprint."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"trials": {}}

    def save(self) -> None:
        if not _is_main():
            return
        atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True))


def run_job(job: dict[str, Any], tracker: Any = None) -> dict[str, Any] | None:
    """Run every trial and export the best; returns the `done` event's fields (None off rank 0)."""
    tracker = tracker if tracker is not None else _tracker(job)
    try:
        return TrainingJob(job, tracker).run()
    finally:
        tracker.close()


def _tracker(job: dict[str, Any]) -> Any:
    """The job's MLflow tracker (rank 0 only); it starts its helper process at once."""
    from llmops.train.track import Tracker

    return Tracker(job.get("tracking_uri") if _is_main() else None, job.get("registry_uri"))


class TrainingJob:
    """One fine-tune's job: its trials, their MLflow runs, the export of the best."""

    def __init__(self, job: dict[str, Any], tracker: Any) -> None:
        from llmops.train.model import load_tokenizer, pick_device

        self.job = job
        self.tracker = tracker
        self.out_dir = Path(job["output_dir"])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.adapter = specs.resolve_adapter(job.get("adapter"))
        self.training = specs.resolve_training(job.get("training"))
        self.select = specs.resolve_select(job.get("select"))
        self.trials = specs.expand_sweep(job.get("sweep"))
        self.device = pick_device()
        self.method = str(job.get("method") or "sft")
        self.tokenizer = load_tokenizer(Path(job["base_model"]))
        self.state = _State(self.out_dir / "state.json")
        self.tags = {str(k): str(v) for k, v in (job.get("tags") or {}).items()}
        self.experiment_id: str | None = None
        self.run_id = ""

    def run(self) -> dict[str, Any] | None:
        from llmops.train.track import flatten

        tracker = self.tracker
        job = self.job
        self.experiment_id = tracker.experiment(job.get("experiment") or "llmops", job.get("artifact_location"))
        self.run_id = tracker.start(
            self.experiment_id, job.get("name", "finetune"), self.tags, self.state.data.get("run_id")
        )
        self.state.data["run_id"] = self.run_id
        self.state.save()
        start = {"pid": os.getpid(), "trials": len(self.trials), "run_id": self.run_id, "device": self.device}
        emit({"event": "start", **start})
        sweep = len(self.trials) > 1
        try:
            params = {**flatten("adapter", self.adapter), **flatten("training", self.training)}
            tracker.params(self.run_id, {**params, **self.job.get("params", {})})
            if sweep:
                tracker.params(self.run_id, {"sweep.trials": str(len(self.trials)), **flatten("select", self.select)})
            results = [self.run_trial(i, overrides) for i, overrides in enumerate(self.trials)]
            if not _is_main():
                return None
            best = _select(results, self.select) if sweep else results[0]
            outcome = self.export(best)
        except BaseException as exc:
            tracker.end(self.run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        tracker.end(self.run_id)
        if sweep:
            outcome["best_trial"] = {"index": best["trial"], "params": best["params"], "run_id": best["run_id"]}
            outcome["trials"] = len(self.trials)
        atomic_write_text(self.out_dir / "result.json", json.dumps(outcome, indent=2, sort_keys=True))
        return outcome

    def run_trial(self, i: int, overrides: dict[str, Any]) -> dict[str, Any]:
        """Train (or resume, or skip when finished) trial `i`; returns its result record."""
        from llmops.train import checkpoint as ckpt
        from llmops.train.data import make_rows
        from llmops.train.loop import LoopSpec, evaluate, train
        from llmops.train.model import load_model, save_adapter

        done = self.state.data["trials"].get(str(i))
        if done and done.get("finished") and Path(done["dir"], "adapter", "adapter_model.safetensors").is_file():
            emit({"event": "trial_skipped", "trial": i, "of": len(self.trials)})
            return done
        adapter, training = specs.trial_config(self.adapter, self.training, overrides)
        record = self._start_trial(i, overrides, adapter, training, (done or {}).get("run_id"))
        train_ex, eval_ex = self._examples(training)
        max_len, packed, pad = int(training["max_seq_length"]), bool(training["packing"]), self.tokenizer.pad_token_id
        model = load_model(Path(self.job["base_model"]), adapter, training, self.device)
        _cpu_threads(self.device, model)
        dpo = self.method == "dpo"
        if dpo:
            from llmops.train.data import pair_rows

            packed = False  # an eval of chosen answers, like the rows it trains on: unpacked
        loop = LoopSpec(
            training=training,
            rows=pair_rows(train_ex) if dpo else make_rows(train_ex, max_len, packed),
            method=self.method,
            checkpoint_dir=Path(self.job["checkpoint_dir"]) / f"trial-{i}",
            device=self.device,
            pad_id=pad,
            compile=_want_compile(self.job, self.device, model),
        )
        started = time.perf_counter()
        result = train(model, loop, lambda e: _on_step(e, self.tracker, record["run_id"]), {"trial": i})
        runtime = time.perf_counter() - started
        eval_loss = evaluate(model, make_rows(eval_ex, max_len, packed), training, self.device, pad)
        tail = result.losses[-result.per_epoch :] or [float("nan")]
        metrics = {
            "train_loss": sum(tail) / len(tail),
            "eval_loss": eval_loss,
            "steps": result.steps,
            "tokens_per_s": result.tokens_per_s,
            "tokens": result.tokens,
            "peak_memory_mb": result.peak_memory_mb,
            "train_runtime_s": runtime,
        }
        emit({"event": "eval", "trial": i, "eval_loss": eval_loss, "train_loss": metrics["train_loss"]})
        self.tracker.metrics(record["run_id"], metrics, result.steps)
        if _is_main():
            save_adapter(model, self.tokenizer, Path(record["dir"]))
            ckpt.clear(loop.checkpoint_dir)
        if len(self.trials) > 1:
            self.tracker.end(record["run_id"])
        metrics["resumed_from_step"] = result.resumed_from
        record.update(finished=True, metrics={k: v for k, v in metrics.items() if v is not None})
        self.state.save()
        return record

    def _start_trial(
        self, i: int, overrides: dict[str, Any], adapter: dict[str, Any], training: dict[str, Any], old_run: str | None
    ) -> dict[str, Any]:
        """The trial's state record; a sweep's trial gets (or reopens) a child MLflow run."""
        from llmops.train.track import flatten

        run_id = self.run_id
        if len(self.trials) > 1:
            name = f"{self.job.get('name', 'finetune')}-trial-{i}"
            tags = {**self.tags, "mlflow.parentRunId": self.run_id, "llmops.trial": str(i)}
            run_id = self.tracker.start(self.experiment_id, name, tags, old_run)
            self.tracker.params(run_id, {**flatten("adapter", adapter), **flatten("training", training)})
        record = {"trial": i, "params": overrides, "run_id": run_id, "finished": False}
        record["dir"] = str(self.out_dir / "trials" / str(i))
        self.state.data["trials"][str(i)] = record
        self.state.save()
        emit({"event": "trial", "trial": i, "of": len(self.trials), "params": overrides})
        return record

    def _examples(self, training: dict[str, Any]) -> tuple[list, list]:
        """Encoded (train, eval) examples for this trial's max_seq_length."""
        import torch

        from llmops.train.data import PromptRenderer, encode_rows, read_jsonl

        torch.manual_seed(int(training["seed"]))
        max_len = int(training["max_seq_length"])
        renderer = PromptRenderer(self.job.get("prompt") or {}, self.tokenizer)
        eval_path = self.job.get("eval_path")
        if self.method == "dpo":
            from llmops.train.data import encode_pairs

            pairs = encode_pairs(read_jsonl(Path(self.job["train_path"])), renderer, self.tokenizer, max_len)
            if not pairs:
                raise ProviderError(f"{self.job['train_path']}: no row has both `chosen` and `rejected` (a `method: "
                                    "dpo` fine-tune trains on preference pairs: `llmops feedback export --pairs`).")
            # eval_loss of a preference fine-tune: the loss of the chosen answers of the eval split.
            chosen = PromptRenderer({**(self.job.get("prompt") or {}), "response_field": "chosen"}, self.tokenizer)
            rows = [r for r in read_jsonl(Path(eval_path)) if isinstance(r.get("chosen"), str)] if eval_path else []
            return pairs, encode_rows(rows, chosen, self.tokenizer, max_len)
        train_ex = encode_rows(read_jsonl(Path(self.job["train_path"])), renderer, self.tokenizer, max_len)
        if not train_ex:
            raise ProviderError(
                f"{self.job['train_path']}: no training example has a response token; check the dataset."
            )
        eval_ex = encode_rows(read_jsonl(Path(eval_path)), renderer, self.tokenizer, max_len) if eval_path else []
        return train_ex, eval_ex

    def export(self, best: dict[str, Any]) -> dict[str, Any]:
        """Copy the best trial into output_dir/model, merge if asked, log and register it.

        output_dir/model keeps `adapter/` and `tokenizer/` (the lock records those paths);
        the run's `model` artifact is an MLflow pyfunc model built from them, and that is
        what the registered version points at.
        """
        from llmops.train import mlflow_model
        from llmops.hashing import file_sha256, folder_sha256
        from llmops.train.model import save_merged

        model_dir = self.out_dir / "model"
        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.mkdir(parents=True)
        for part in ("adapter", "tokenizer"):
            shutil.copytree(Path(best["dir"]) / part, model_dir / part)
        base_ref = mlflow_model.base_reference(self.job)
        mlflow_model.make_adapter_portable(model_dir / "adapter", base_ref)
        adapter_sha = file_sha256(model_dir / "adapter" / "adapter_model.safetensors")
        outcome: dict[str, Any] = {
            "run_id": self.run_id,
            "adapter": {"path": str(model_dir / "adapter"), "sha256": adapter_sha},
            "tokenizer": {"path": str(model_dir / "tokenizer"), "sha256": folder_sha256(model_dir / "tokenizer")},
            "metrics": best.get("metrics", {}),
        }
        if (self.job.get("export") or {}).get("merge"):
            base = Path(self.job["base_model"])
            outcome["merged"] = save_merged(base, model_dir / "adapter", self.tokenizer, model_dir / "merged")
        tracker = self.tracker
        if best["run_id"] != self.run_id:  # a sweep: the parent run gets the best trial's metrics
            tracker.metrics(self.run_id, {k: v for k, v in outcome["metrics"].items() if k != "resumed_from_step"})
        tracker.tags(self.run_id, {"llmops.adapter_sha256": adapter_sha})
        model = {"adapter_dir": model_dir / "adapter", "tokenizer_dir": model_dir / "tokenizer", "base": base_ref}
        tracker.log_model(self.run_id, MODEL_ARTIFACT, model, scratch=self.out_dir)
        if "merged" in outcome:
            tracker.artifacts(self.run_id, model_dir / "merged", MERGED_ARTIFACT)
        name = self.job.get("registered_model")
        if name and tracker.enabled:
            registered = self.state.data.get("registered") or {}
            if registered.get("adapter_sha256") != adapter_sha:  # not yet registered by an earlier attempt
                lineage = {**self.tags, "llmops.adapter_sha256": adapter_sha, "llmops.run_id": self.run_id}
                version = tracker.register(name, self.run_id, MODEL_ARTIFACT, lineage)
                registered = {"adapter_sha256": adapter_sha, "version": version}
                self.state.data["registered"] = registered
                self.state.save()
            outcome["model_name"], outcome["model_version"] = name, registered["version"]
        return outcome


def _on_step(event: dict[str, Any], tracker: Any, run_id: str) -> None:
    emit(event)
    if event.get("event") == "step":
        step = event["step"]
        tracker.metrics(
            run_id, {"loss": event["loss"], "learning_rate": event["lr"], "tokens_per_s": event["tokens_per_s"]}, step
        )


def _want_compile(job: dict[str, Any], device: str, model: Any) -> bool:
    """torch.compile the decoder layers? `compile` in the job spec or LLMOPS_TORCH_COMPILE.

    auto (the default): on a GPU, for models of 100M parameters or more; compiling costs
    tens of seconds, which only pays off where steps are expensive.
    """
    choice = os.environ.get("LLMOPS_TORCH_COMPILE", str(job.get("compile", "auto"))).lower()
    if choice in ("1", "true", "yes"):
        return True
    if choice in ("0", "false", "no"):
        return False
    return device.startswith("cuda") and sum(p.numel() for p in model.parameters()) >= 100_000_000


def _cpu_threads(device: str, model: Any) -> None:
    """One CPU thread for small models (unless OMP_NUM_THREADS says otherwise).

    Their matrices are too small to split, and spinning worker threads slow training
    down many times over when other processes compete for the cores.
    """
    import torch

    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        if sum(p.numel() for p in model.parameters()) < 50_000_000:
            torch.set_num_threads(1)


def _select(results: list[dict[str, Any]], select: dict[str, Any]) -> dict[str, Any]:
    metric, mode = select["metric"], select["mode"]
    scored = [r for r in results if r.get("metrics", {}).get(metric) is not None]
    if not scored:
        raise ProviderError(
            f"select.metric '{metric}' was not measured by any trial (eval_loss needs the dataset's eval "
            "split: add a `split` step); choose train_loss or give the dataset an eval split."
        )
    key = (lambda r: r["metrics"][metric]) if mode == "min" else (lambda r: -r["metrics"][metric])
    return min(scored, key=key)
