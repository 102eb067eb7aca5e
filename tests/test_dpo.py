"""Issue 12, preference tuning: a `method: dpo` fine-tune on a dataset joining the tickets and
the exported preference pairs (`sources:`), trained on CPU with a tiny model, registered and
gated like any fine-tune; new ratings plan the whole chain again. Real DVC, MLflow, training."""

from __future__ import annotations

import json
import socket

import pytest

# The CLI calls here start model servers that outlive the command: each runs in a fresh
# interpreter, as a user's would (tests/conftest.py `Project.run`).
CLI_SUBPROCESS = True

pytestmark = pytest.mark.slow

CONFIG = """\
version: 1
project: prefs
datasets:
  tickets:
    source: data/tickets.jsonl
    prepare:
      - split: {{eval_fraction: 0.1, seed: 13}}
  prefs:
    sources: [data/tickets.jsonl, data/feedback.jsonl]
    prepare:
      - dedupe: {{}}  # whole rows: a pair about a ticket's question is not that ticket
      - split: {{eval_fraction: 0.2, seed: 13}}
prompts:
  support: {{template: prompts/support.j2, variables: [question], response_field: answer}}
base_models:
  tiny:
    build: {{architecture: llama, hidden_size: 32, layers: 1, heads: 2, intermediate_size: 64,
             vocab_size: 384, max_position_embeddings: 256, tokenizer_from: tickets, seed: 13}}
finetunes:
  liked:
    method: dpo
    base_model: tiny
    dataset: prefs
    prompt: support
    adapter: {{type: lora, r: 4, alpha: 8}}
    training: {{epochs: 2, learning_rate: 5.0e-3, batch_size: 4, max_seq_length: 96, seed: 13, dpo_beta: 0.5}}
evals:
  quality:
    model: liked
    dataset: tickets
    metrics: [rougeL, perplexity]
    thresholds: {{perplexity: "{gate}"}}
    decoding: {{max_new_tokens: 8}}
    limit: 6
deployments:
  prod:
    model: liked
    gates: [quality]
    serve: {{port: {port}}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pairs(project, n: int) -> str:
    rows = [json.loads(line) for line in project.read("data/tickets.jsonl").splitlines()][:n]
    return "".join(json.dumps({"question": r["question"], "chosen": r["answer"], "rejected": "No idea, sorry."}) + "\n"
                   for r in rows)


def test_a_dpo_fine_tune_trains_on_pairs_registers_and_is_gated_and_new_ratings_plan_the_chain(project):
    project.copy_example()
    port = _free_port()
    project.write({"llmops.yaml": CONFIG.format(port=port, gate="<= 100000"), "data/feedback.jsonl": _pairs(project, 40)})
    try:
        res = project.run("apply", "--auto-approve")
        assert res.returncode == 0, res.stdout + res.stderr
        lock = project.locked()
        ft = lock["finetunes.liked"]["outputs"]
        assert ft["model_name"] == "liked" and ft["model_version"] == "1"
        assert ft["metrics"]["steps"] >= 2 and ft["cost"]["tokens"] > 0
        from llmops.integrations.mlflow import client

        mlflow = client(project.root, {})
        run = mlflow.get_run(ft["run_id"])
        assert run.data.params["method"] == "dpo" and run.data.params["training.dpo_beta"] == "0.5"
        losses = [m.value for m in mlflow.get_metric_history(ft["run_id"], "loss")]
        assert losses and losses[0] == pytest.approx(0.6931, abs=0.02)  # -log sigmoid(0): policy = reference
        assert min(losses) < losses[0]  # the chosen answers gained on the rejected ones
        assert lock["deployments.prod"]["outputs"]["version"] == "1"

        # New ratings: the exported pairs grow. The plan shows the chain from the data to the promotion.
        project.write({"data/feedback.jsonl": _pairs(project, 60)})
        plan = json.loads(project.run("plan", "--json").stdout)
        actions = {c["address"]: c["action"] for c in plan["resource_changes"]}
        assert actions == {"datasets.tickets": "no-op", "prompts.support": "no-op", "base_models.tiny": "no-op",
                           "datasets.prefs": "replace", "finetunes.liked": "replace", "evals.quality": "replace",
                           "deployments.prod": "update"}
        assert plan["cost"]["actions"] == 2
        # A gate the new version misses: it is trained and registered, but not promoted.
        project.write({"llmops.yaml": CONFIG.format(port=port, gate="<= 1.0")})
        res = project.run("apply", "--auto-approve")
        assert res.returncode == 1, res.stdout + res.stderr
        assert "gate failed, nothing was promoted" in res.stdout + res.stderr
        lock = project.locked()
        assert lock["finetunes.liked"]["outputs"]["model_version"] == "2"
        assert lock["deployments.prod"]["outputs"]["version"] == "1"
        assert str(mlflow.get_model_version_by_alias("liked", "production").version) == "1"
    finally:
        project.run("down", "deployments.prod")


def test_pairs_share_their_prompt_and_rows_without_both_answers_are_left_out(tmp_path):
    from transformers import AutoTokenizer

    from llmops.errors import ProviderError
    from llmops.train.build import build_tiny_model
    from llmops.train.data import IGNORE, PromptRenderer, encode_pairs

    texts = ["How do I reset my password?", "Open settings.", "Where is my parcel?", "It ships today."] * 4
    build_tiny_model({"hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64, "vocab_size": 300,
                      "max_position_embeddings": 128}, texts, tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    renderer = PromptRenderer({"text": "### Question:\n{{ question }}\n### Answer:\n", "response_field": "answer"})
    rows = [{"question": "Where is my parcel?", "answer": "It ships today."},  # a ticket: no pair
            {"question": "Where is my parcel?", "chosen": "It ships today.", "rejected": "Open settings."}]
    (chosen, rejected), = encode_pairs(rows, renderer, tok, 64)
    prompt_len = sum(1 for label in chosen.labels if label == IGNORE)
    assert chosen.input_ids[:prompt_len] == rejected.input_ids[:prompt_len]  # the same prompt
    assert chosen.input_ids[prompt_len:] != rejected.input_ids[prompt_len:]
    assert chosen.input_ids[-1] == rejected.input_ids[-1] == tok.eos_token_id
    with pytest.raises(ProviderError, match="uses a field the row lacks"):
        encode_pairs([{"chosen": "a", "rejected": "b"}], renderer, tok, 64)
