"""The finetunes provider and the local runner: a real training job in a subprocess,
real MLflow on SQLite under the project's .llmops/, cancellation and resume, failures.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from conftest import copy_prepared_mlflow_db

from llmops.errors import ProviderError
from llmops.engine.lockfile import LockedResource
from llmops.providers.base import ApplyRequest, ProgressEvent, ProviderContext
from llmops.providers.finetunes import FinetunesProvider
from llmops.runners.base import Job
from llmops.runners.local import LocalRunner, job_command
from llmops.runners.select import get_runner

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
SPEC = {
    "base_model": "tiny",
    "dataset": "colours",
    "prompt": "qa",
    "adapter": {"r": 4, "alpha": 8, "target_modules": TARGETS},
    "training": {"epochs": 2, "learning_rate": 3e-2, "batch_size": 4, "max_seq_length": 64, "save_steps": 2},
}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built_base(tmp_path_factory) -> tuple[Path, dict]:
    from llmops.train.build import build_tiny_model

    folder = tmp_path_factory.mktemp("models") / "tiny"
    texts = [f"What colour is box {i}? Box {i} is {c}." for i, c in enumerate(["red", "blue", "green"])] * 3
    info = build_tiny_model({"hidden_size": 32, "heads": 2, "intermediate_size": 64, "vocab_size": 300}, texts, folder)
    return folder, info


@pytest.fixture
def setup(project, built_base):
    """A project with a prepared dataset, a built base model and a prompt, as upstream lock entries."""
    import shutil

    colours = ["red", "blue", "green"]
    keys = [0, 1, 2] * 5 + [0]
    rows = [{"question": f"What colour is box {k}?", "answer": f"Box {k} is {colours[k]}."} for k in keys]
    project.write(
        {
            ".llmops/data/colours/train.jsonl": "".join(json.dumps(r) + "\n" for r in rows),
            ".llmops/data/colours/eval.jsonl": "".join(json.dumps(r) + "\n" for r in rows[:4]),
            "prompts/qa.j2": "Q: {{ question }}\nA:\n",
        }
    )
    shutil.copytree(built_base[0], project.path(".llmops/models/tiny"))
    # The embedded store as the first apply in this project would create it (MLflow's default
    # artifact root is the project's ./mlruns there), copied instead of migrated afresh.
    copy_prepared_mlflow_db(project.path(".llmops/mlflow.db"), project.root.resolve() / "mlruns")
    config = {
        "version": 1,
        "project": "colour-bot",
        "prompts": {"qa": {"template": "prompts/qa.j2", "variables": ["question"]}},
    }
    ctx = ProviderContext(root=project.root, state_dir=project.root / ".llmops", settings={}, config=config)
    train, eval_ = project.path(".llmops/data/colours/train.jsonl"), project.path(".llmops/data/colours/eval.jsonl")
    upstream = {
        "datasets.colours": LockedResource(
            "datasets.colours",
            "d" * 64,
            outputs={
                "train": {"path": ".llmops/data/colours/train.jsonl", "md5": md5(train)},
                "eval": {"path": ".llmops/data/colours/eval.jsonl", "md5": md5(eval_)},
            },
        ),
        "base_models.tiny": LockedResource(
            "base_models.tiny", "b" * 64, outputs={"path": ".llmops/models/tiny", "files": built_base[1]["files"]}
        ),
        "prompts.qa": LockedResource("prompts.qa", "p" * 64, outputs={}),
    }
    return ctx, upstream


FP = "sha256:" + "f" * 64


def request(ctx, upstream, spec=None, fingerprint=FP, progress=None, cancelled=None) -> ApplyRequest:
    return ApplyRequest(
        address="finetunes.colours",
        name="colours",
        spec=spec or SPEC,
        action="create",
        fingerprint=fingerprint,
        before=None,
        upstream=upstream,
        progress=progress or (lambda e: None),
        cancelled=cancelled or (lambda: False),
        upstream_specs={"prompts.qa": ctx.config["prompts"]["qa"]},
    )


def test_cancelled_apply_fails_then_resumes_and_records_outputs(setup, project):
    ctx, upstream = setup
    provider = FinetunesProvider(ctx)
    events: list[ProgressEvent] = []

    def record(event: ProgressEvent) -> None:
        events.append(event)

    # 16 rows / 4 per batch * 2 epochs = 8 steps; stop after step 5 (checkpoints every 2).
    with pytest.raises(ProviderError) as err:
        stop_after_5 = lambda: any((e.completed or 0) >= 5 for e in events)  # noqa: E731
        provider.apply(request(ctx, upstream, progress=record, cancelled=stop_after_5))
    assert "was cancelled" in err.value.message and "train.log" in err.value.message
    run_dir = project.path(".llmops/runs/finetunes/colours/ffffffffffff")
    saved = [p.name for p in (run_dir / "checkpoints" / "trial-0").iterdir()]
    assert saved and saved[0].startswith("step-")
    step = int(saved[0].split("-")[1])
    assert step >= 4

    events.clear()
    result = provider.apply(request(ctx, upstream, progress=record))
    assert any(e.message == f"resumed at step {step}" for e in events)
    completed = [e.completed for e in events if e.message.startswith("step")]
    assert completed[0] == step + 1 and completed[-1] == 8 and all(e.total == 8 for e in events)

    out = result.outputs
    assert out["adapter"]["path"] == ".llmops/runs/finetunes/colours/ffffffffffff/model/adapter"
    weights = project.path(out["adapter"]["path"]) / "adapter_model.safetensors"
    assert out["adapter"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert out["tokenizer_sha256"] == out["tokenizer"]["sha256"]
    assert out["model_name"] == "colours" and out["model_version"] == "1"
    assert out["metrics"]["eval_loss"] > 0 and out["metrics"]["steps"] == 8
    assert result.inputs["dataset_md5"] == {
        "train": upstream["datasets.colours"].outputs["train"]["md5"],
        "eval": upstream["datasets.colours"].outputs["eval"]["md5"],
    }
    assert len(result.inputs["base_model_files_sha"]) == 64
    json.dumps(result.outputs), json.dumps(result.inputs)  # lock-serialisable

    # Embedded MLflow under the project; one run for both attempts; lineage on the version.
    assert project.path(".llmops/mlflow.db").is_file()
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(project.path(".llmops/mlflow.db"))) as db:  # the run is in this very file
        assert db.execute("SELECT run_uuid, status FROM runs").fetchall() == [(out["run_id"], "FINISHED")]
    from llmops.integrations import mlflow as tracking

    client = tracking.client(project.root, {})
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["llmops.fingerprint"] == FP
    assert client.get_experiment(run.info.experiment_id).name == "colour-bot"
    assert client.get_experiment(run.info.experiment_id).artifact_location.startswith(
        project.path(".llmops/mlartifacts").resolve().as_uri()
    )
    version = client.get_model_version("colours", "1")
    assert version.tags["llmops.dataset.train_md5"] == result.inputs["dataset_md5"]["train"]
    assert version.tags["llmops.base_model_files_sha"] == result.inputs["base_model_files_sha"]
    assert version.tags["llmops.version"]

    # refresh sees a deleted adapter; delete removes local files but keeps MLflow history.
    locked = LockedResource("finetunes.colours", FP, outputs=out)
    assert provider.refresh("colours", SPEC, locked) == []
    weights.unlink()
    assert "missing" in provider.refresh("colours", SPEC, locked)[0].reason
    provider.delete("colours", locked)
    assert not project.path(".llmops/runs/finetunes/colours").exists()
    assert client.get_model_version("colours", "1").run_id == out["run_id"]


def test_failing_job_raises_with_the_log_tail(setup):
    ctx, upstream = setup
    ctx.config["prompts"]["qa"]["response_field"] = "reply"
    with pytest.raises(ProviderError) as err:
        FinetunesProvider(ctx).apply(request(ctx, upstream, fingerprint="e" * 64))
    msg = err.value.message
    assert "failed (exit code 1)" in msg
    assert "no field 'reply'" in msg  # the job's own error, from the log tail
    assert "llmops apply" in msg


def test_missing_upstream_and_qlora_without_bitsandbytes(setup):
    ctx, upstream = setup
    provider = FinetunesProvider(ctx)
    partial = {k: v for k, v in upstream.items() if k != "base_models.tiny"}
    with pytest.raises(ProviderError, match="base_models.tiny has not been applied"):
        provider.apply(request(ctx, partial))
    pytest.importorskip("torch")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ProviderError, match="bitsandbytes"):
            provider.apply(request(ctx, upstream, spec={**SPEC, "adapter": {"type": "qlora"}}))


def test_describe_counts_sweep_trials(setup):
    ctx, _ = setup
    provider = FinetunesProvider(ctx)
    assert provider.describe("colours", SPEC, None) == {"trials": 1}
    sweep = {"training.learning_rate": [1e-4, 2e-4], "adapter.r": [8, 16]}
    assert provider.describe("colours", {**SPEC, "sweep": sweep}, None) == {"trials": 4}
    assert provider.file_inputs("colours", SPEC) == ["prompts/qa.j2"]


# -- runners -----------------------------------------------------------------------------


def test_local_runner_streams_lines_logs_and_tail(tmp_path):
    (tmp_path / "chatty.py").write_text(
        "import sys\nfor i in range(60):\n    print(f'line {i}')\nprint('oops', file=sys.stderr)\nsys.exit(3)\n"
    )
    seen: list[str] = []
    job = Job(name="c", module="chatty", args=[], workdir=tmp_path, log_path=tmp_path / "logs" / "c.log")
    result = LocalRunner().run(job, seen.append)
    assert result.exit_code == 3
    assert seen[0] == "line 0" and seen[-1] == "oops" and len(seen) == 61
    assert result.log_tail.splitlines() == seen[-40:]
    assert (tmp_path / "logs" / "c.log").read_text().splitlines() == seen


def test_local_runner_cancels_a_running_job(tmp_path):
    (tmp_path / "sleepy.py").write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    job = Job(name="s", module="sleepy", args=[], workdir=tmp_path, log_path=tmp_path / "s.log")
    seen: list[str] = []
    result = LocalRunner(grace_s=2).run(job, seen.append, cancelled=lambda: "started" in seen)
    assert result.exit_code != 0
    assert "cancelled" in result.log_tail


def test_runner_selection_and_multi_gpu_command(tmp_path):
    assert isinstance(get_runner({}, {}), LocalRunner)
    assert isinstance(get_runner({"runner": "docker"}, {"resources": {"runner": "local"}}), LocalRunner)
    with pytest.raises(ProviderError, match="unknown"):
        get_runner({"runner": "slurm"}, {})
    from llmops.runners.docker import DockerRunner

    docker = get_runner({"runner": "local", "docker_host": "tcp://127.0.0.1:1"}, {"resources": {"runner": "docker"}})
    assert isinstance(docker, DockerRunner) and docker.docker_host == "tcp://127.0.0.1:1"
    job = Job(name="x", module="llmops.train", args=["spec.json"], workdir=tmp_path, log_path=tmp_path / "l", gpus=2)
    cmd = job_command(job)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-3:] == ["--module", "llmops.train", "spec.json"]
    job.gpus = 1
    assert job_command(job) == [sys.executable, "-m", "llmops.train", "spec.json"]
