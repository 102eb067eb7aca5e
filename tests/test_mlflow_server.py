"""The same apply against a real `mlflow server` on 127.0.0.1 (PostgreSQL-backed, artifacts
proxied by the server: the `pg_mlflow_server` fixture) instead of the embedded SQLite."""

from __future__ import annotations

import socket

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


@pytest.mark.slow
def test_apply_against_a_real_tracking_server(project, pg_mlflow_server):
    project.copy_example()
    project.write({"llmops.yaml": CONFIG.format(uri=pg_mlflow_server)})
    res = project.run("apply", "--auto-approve")
    assert res.returncode == 0, res.stdout + res.stderr
    assert not project.path(".llmops/mlflow.db").exists()  # nothing went to the embedded store

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=pg_mlflow_server, registry_uri=pg_mlflow_server)
    version = client.get_model_version_by_alias("lora", "production")
    assert str(version.version) == "1"
    assert version.tags.get("llmops.adapter_sha256")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and "train_loss" in run.data.metrics
    assert [a.path for a in client.list_artifacts(version.run_id)]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri  # proxied by the server
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
