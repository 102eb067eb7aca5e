"""Issue 4 end to end, offline: one apply trains, evaluates, promotes and serves; gates refuse
a promotion; a hand-moved alias is drift; rollback and down work. Real MLflow, real HTTP."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

# The CLI calls here start model servers that outlive the command: each runs in a fresh
# interpreter, as a user's would (tests/conftest.py `Project.run`).
CLI_SUBPROCESS = True


CONFIG = """\
version: 1
project: flow
datasets:
  tickets:
    source: data/tickets.jsonl
    prepare:
      - dedupe: {{fields: [question]}}
      - split: {{eval_fraction: 0.1, seed: 13}}
prompts:
  support: {{template: prompts/support.j2, variables: [question], response_field: answer}}
base_models:
  tiny:
    build: {{architecture: llama, hidden_size: 64, layers: 2, heads: 4, intermediate_size: 128,
             vocab_size: 512, max_position_embeddings: 256, tokenizer_from: tickets, seed: 13}}
finetunes:
  lora:
    base_model: tiny
    dataset: tickets
    prompt: support
    adapter: {{type: lora, r: 8, alpha: 16}}
    training: {{epochs: 4, learning_rate: {lr}, batch_size: 8, max_seq_length: 96, seed: 13}}
evals:
  quality:
    model: lora
    dataset: tickets
    metrics: [rougeL, perplexity]
    thresholds: {{rougeL: "{threshold}"}}
    decoding: {{max_new_tokens: 12}}
    limit: 8
{extra}deployments:
  prod:
    model: lora
    alias: production
    gates: [quality]
    serve: {{port: {port}}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(project):
    from llmops.integrations.mlflow import client

    return client(project.root, {})


@pytest.mark.slow
def test_train_evaluate_promote_serve_gate_drift_rollback(project):
    port = _free_port()
    project.copy_example()
    write = lambda lr="1.0e-2", threshold=">= 0.0", extra="": project.write(  # noqa: E731
        {"llmops.yaml": CONFIG.format(lr=lr, threshold=threshold, port=port, extra=extra)})
    write()
    try:
        res = project.run("apply", "--auto-approve")
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"deployments.prod: lora v1 -> alias production; serving http://127.0.0.1:{port}" in res.stdout
        assert "evals.quality: rougeL" in res.stdout and "(>= 0 passed)" in res.stdout
        lock = project.locked()
        dep = lock["deployments.prod"]["outputs"]
        assert dep["version"] == "1" and dep["alias"] == "production"
        assert dep["endpoint"] == f"http://127.0.0.1:{port}"
        assert _client(project).get_model_version_by_alias("lora", "production").version in ("1", 1)

        # A client that speaks the OpenAI API gets completions from the served model.
        from openai import OpenAI

        api = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        out = api.completions.create(model="lora", prompt="### Question:\nWhere is my parcel?\n### Answer:\n", max_tokens=8)
        assert out.choices[0].text and out.usage.completion_tokens > 0
        chat = api.chat.completions.create(model="lora", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert chat.choices[0].message.role == "assistant"

        # Raising the threshold above the recorded metric: re-check only, and refuse promotion.
        rouge = lock["evals.quality"]["outputs"]["metrics"]["rougeL"]
        run_id = lock["evals.quality"]["outputs"]["run_id"]
        write(threshold=">= 0.99")
        res = project.run("plan")
        assert "evals.quality" in res.stdout and "update" in res.stdout.split("evals.quality")[1].splitlines()[0]
        assert "thresholds.rougeL: >= 0.0 -> >= 0.99" in res.stdout
        res = project.run("apply", "--auto-approve")
        assert res.returncode == 1
        assert f"gate failed, nothing was promoted: evals.quality: rougeL = {rouge:.4g}, needs >= 0.99: missed by" in res.stdout
        lock = project.locked()
        assert lock["evals.quality"]["outputs"]["run_id"] == run_id  # not re-run
        assert lock["evals.quality"]["outputs"]["passed"] is False
        assert lock["deployments.prod"]["outputs"]["version"] == "1"

        # A new model version (learning rate changed) is trained, evaluated and promoted.
        write(lr="2.0e-2")
        res = project.run("apply", "--auto-approve")
        assert res.returncode == 0, res.stdout + res.stderr
        dep = project.locked()["deployments.prod"]["outputs"]
        assert dep["version"] == "2" and dep["previous"]["version"] == "1"

        # Someone moves the alias by hand: plan shows drift, apply puts it back.
        _client(project).set_registered_model_alias("lora", "production", "1")
        res = project.run("plan", "--detailed-exitcode")
        assert res.returncode == 2
        assert "drift: alias production -> v1, lock says v2" in res.stdout
        assert project.run("apply", "--auto-approve").returncode == 0
        assert str(_client(project).get_model_version_by_alias("lora", "production").version) == "2"

        # A baseline reads what the deployment serves now (live) and limits regressions against it.
        regress = ("  regress:\n    model: lora\n    dataset: tickets\n    metrics: [rougeL]\n"
                   "    decoding: {max_new_tokens: 12}\n    limit: 8\n"
                   "    baseline: {deployment: prod, max_drop: {rougeL: 0.0}}\n")
        write(lr="2.0e-2", extra=regress)
        res = project.run("apply", "--auto-approve")
        assert res.returncode == 0, res.stdout + res.stderr
        out = project.locked()["evals.regress"]["outputs"]
        assert out["baseline"]["deployment"] == "prod"
        assert out["baseline"]["metrics"]["rougeL"] == pytest.approx(out["metrics"]["rougeL"])  # same model served
        gate = out["gates"]["rougeL vs baseline"]
        assert gate["passed"] is True and gate["baseline"] == pytest.approx(out["metrics"]["rougeL"])

        # Rollback moves the alias to the previous version, serves it, and records it.
        res = project.run("rollback", "deployments.prod")
        assert res.returncode == 0, res.stderr
        assert "now points to v1 (was v2)" in res.stdout
        assert str(_client(project).get_model_version_by_alias("lora", "production").version) == "1"
        assert project.locked()["deployments.prod"]["outputs"]["version"] == "1"
        assert "No changes." in project.run("plan").stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert json.load(r)["status"] == "ok"
    finally:
        res = project.run("down", "prod")
    assert "Server stopped." in res.stdout
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
