"""The same apply against a real `mlflow server` on 127.0.0.1 instead of the embedded SQLite."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


CONFIG = """\
version: 1
project: remote
settings: {{tracking_uri: "{uri}"}}
datasets:
  tickets: {{source: data/tickets.jsonl, prepare: [{{split: {{eval_fraction: 0.1, seed: 13}}}}]}}
prompts:
  support: {{template: prompts/support.j2, variables: [question]}}
base_models:
  tiny: {{build: {{architecture: llama, hidden_size: 32, layers: 1, heads: 2, intermediate_size: 64, tokenizer_from: tickets}}}}
finetunes:
  lora: {{base_model: tiny, dataset: tickets, prompt: support, training: {{max_steps: 4, batch_size: 4, max_seq_length: 64}}}}
evals:
  quality: {{model: lora, dataset: tickets, metrics: [perplexity], thresholds: {{perplexity: "<= 100000"}}, decoding: {{max_new_tokens: 2}}, limit: 4}}
deployments:
  prod: {{model: lora, alias: production, gates: [quality]}}
"""


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "w"), env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("mlflow server exited:\n" + (folder / "server.log").read_text()[-2000:])
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not answer /health within 90 s")
    yield url
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_apply_against_a_real_tracking_server(project, mlflow_server):
    project.copy_example()
    project.write({"llmops.yaml": CONFIG.format(uri=mlflow_server)})
    res = project.run("apply", "--auto-approve")
    assert res.returncode == 0, res.stdout + res.stderr
    assert not project.path(".llmops/mlflow.db").exists()  # nothing went to the embedded store

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    version = client.get_model_version_by_alias("lora", "production")
    assert str(version.version) == "1"
    assert version.tags.get("llmops.adapter_sha256")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and "train_loss" in run.data.metrics
    assert [a.path for a in client.list_artifacts(version.run_id)]  # artifacts went through the server
    assert client.get_prompt_version_by_alias("support", "default").version in (1, "1")
    assert "No changes." in project.run("plan").stdout

    # Drift is read from the server too.
    client.delete_registered_model_alias("lora", "production")
    res = project.run("plan")
    assert "drift: alias production -> nothing, lock says v1" in res.stdout


def test_unreachable_tracking_server_fails_before_any_work(project):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    project.copy_example()
    project.write({"llmops.yaml": CONFIG.format(uri=f"http://127.0.0.1:{port}")})
    res = project.run("apply", "--auto-approve")
    assert res.returncode == 1
    assert f"cannot reach the MLflow tracking server http://127.0.0.1:{port}" in res.stderr
    assert not project.path("llmops.lock").exists()
