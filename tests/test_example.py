"""The example project itself, as the quick start applies it: fine-tuning beats the base by a
real margin, answers sampled at temperature 1 read as words, the plan and `llmops show` put
the fine-tune beside the base, versions carry their lineage, and the plan prices a retrain.

One apply of example-project/ (its llmops.yaml unchanged but for the port), then a retrain
of the fine-tune alone with a new learning rate. Real DVC, MLflow, training and server."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess

import pytest
import yaml

from conftest import REPO

# The CLI calls here start model servers that outlive the command: each runs in a fresh
# interpreter, as a user's would (tests/conftest.py `Project.run`).
CLI_SUBPROCESS = True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git(root, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """example-project/ copied and committed (a clean tree), applied once; its server stopped after."""
    from conftest import Project

    root = tmp_path_factory.mktemp("example") / "example-project"
    shutil.copytree(REPO / "example-project", root, ignore=shutil.ignore_patterns(".llmops", "llmops.lock", "dvc.*"))
    port = _free_port()
    config = (root / "llmops.yaml").read_text()
    assert "serve: {port: 8765}" in config
    (root / "llmops.yaml").write_text(config.replace("serve: {port: 8765}", f"serve: {{port: {port}}}"))
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "example")
    project = Project(root, subprocess=CLI_SUBPROCESS)
    res = project.run("apply", "--auto-approve")
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        yield project, port, res.stdout
    finally:
        project.run("down", "deployments.support-prod")


@pytest.mark.slow
def test_fine_tuning_beats_the_base_and_the_gates_ask_for_it(example):
    project, _, out = example
    lock = project.locked()
    tuned, base = lock["evals.support-quality"]["outputs"], lock["evals.support-base"]["outputs"]
    assert base["model"] == "base_models.tiny" and tuned["model"] == "finetunes.support-lora"
    assert tuned["metrics"]["rougeL"] >= 0.40
    assert tuned["metrics"]["rougeL"] >= base["metrics"]["rougeL"] + 0.20
    assert tuned["metrics"]["exact_match"] > 0
    compared = tuned["comparison"]
    assert compared["eval"] == "evals.support-base"
    assert compared["metrics"]["rougeL"] == {
        "value": base["metrics"]["rougeL"],
        "delta": pytest.approx(tuned["metrics"]["rougeL"] - base["metrics"]["rougeL"], abs=1e-6),
    }
    gain = tuned["gates"]["rougeL gain vs support-base"]
    assert gain["passed"] and gain["op"] == ">=" and gain["baseline"] == base["metrics"]["rougeL"]
    assert tuned["passed"] and lock["deployments.support-prod"]["outputs"]["alias"] == "production"
    # The base was pre-trained on the project's text: it knows the words (low perplexity on
    # the answers) but not question -> answer.
    pre = lock["base_models.tiny"]["outputs"]["pretrain"]
    assert pre["last_loss"] < pre["first_loss"] / 5
    assert "[+" in out and "vs support-base]" in out
    # The latency figure says what it rests on.
    spread = tuned["latency"]
    assert spread["requests"] == tuned["rows"] and 1 <= spread["timed"] <= spread["requests"]
    assert spread["min_ms"] <= spread["p50_ms"] <= spread["p95_ms"] <= spread["max_ms"]


@pytest.mark.slow
def test_answers_sampled_at_temperature_one_read_as_words(example):
    from openai import OpenAI

    project, port, _ = example
    vocabulary = set()
    for line in (project.root / "data" / "tickets.jsonl").read_text().splitlines():
        row = json.loads(line)  # the words the base was pre-trained on
        vocabulary |= set(re.findall(r"[A-Za-z]+", row["question"] + " " + row["answer"]))
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    questions = ["How do I reset my password on my laptop?", "Can I return the keyboard for a refund?",
                 "Do you ship the backpack to Japan?"]
    answers = []
    for seed, question in enumerate(questions):
        answer = client.completions.create(model="support-lora", prompt=f"### Question:\n{question}\n### Answer:\n",
                                           max_tokens=32, temperature=1.0, seed=seed).choices[0].text
        assert "\ufffd" not in answer and not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", answer), answer
        answers.append(answer)
    # Each answer has words, most of them the training data's; a sampled answer may be short
    # (one word, then the end of text), so length counts over all three.
    words = [re.findall(r"[A-Za-z]+", answer) for answer in answers]
    assert all(words) and sum(map(len, words)) >= 9, answers
    flat = [w for ws in words for w in ws]
    assert sum(w in vocabulary for w in flat) / len(flat) >= 0.8, (answers, [w for w in flat if w not in vocabulary])


@pytest.mark.slow
def test_plan_and_show_put_the_fine_tune_beside_the_base(example):
    project, _, _ = example
    res = project.run("plan", "--detailed-exitcode")
    assert res.returncode == 0, res.stdout + res.stderr
    # A documented default written out changes nothing.
    config = project.read("llmops.yaml")
    project.path("llmops.yaml").write_text(config.replace("      seed: 13\n\nevals:", "      seed: 13\n"
                                                          "      lr_scheduler: linear\n\nevals:"))
    try:
        assert "lr_scheduler: linear" in project.read("llmops.yaml")
        res = project.run("plan", "--detailed-exitcode")
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        project.path("llmops.yaml").write_text(config)
    shown = project.run("show")
    assert shown.returncode == 0
    assert "evals.support-quality vs evals.support-base" in shown.stdout
    row = next(line for line in shown.stdout.splitlines() if line.strip().startswith("rougeL"))
    tuned, base, delta = (float(x) for x in row.split()[1:4])
    assert delta == pytest.approx(tuned - base, abs=2e-3) and delta >= 0.2
    # A pull request that changes the eval's gate shows the comparison in its comment.
    project.path("llmops.yaml").write_text(config.replace('rougeL: ">= 0.40"', 'rougeL: ">= 0.45"'))
    try:
        md = project.run("plan", "--markdown").stdout
    finally:
        project.path("llmops.yaml").write_text(config)
    assert "| metric | last applied | `evals.support-base` | delta | threshold | last value passes? |" in md
    assert re.search(r"\| rougeL \| [0-9.]+ \| [0-9.]+ \| \+[0-9.]+ \| >= 0.45 \| ✅ \|", md), md


def _get(port: int, path: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_chat_goes_through_the_trained_prompt_and_the_server_says_what_it_serves(example):
    import openai
    from openai import OpenAI

    project, port, _ = example
    lock = project.locked()
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    rows = [json.loads(line) for line in project.path(lock["datasets.tickets"]["outputs"]["eval"]["path"])
            .read_text().splitlines()][:5]
    for row in rows:  # the same answer through chat as through the templated completion
        chat = client.chat.completions.create(model="support-lora", temperature=0, max_tokens=24,
                                              messages=[{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": row["question"]}])
        completion = client.completions.create(model="support-lora", temperature=0, max_tokens=24,
                                               prompt=f"### Question:\n{row['question']}\n### Answer:\n")
        assert chat.choices[0].message.content == completion.choices[0].text
        assert chat.usage.prompt_tokens == completion.usage.prompt_tokens
    health, models = _get(port, "/health"), _get(port, "/v1/models")
    weights = lock["finetunes.support-lora"]["outputs"]["adapter"]["sha256"]
    prompt = lock["prompts.support"]["outputs"]
    for served in (health, models["data"][0]["llmops"]):
        assert served["version"] == "1" and served["alias"] == "production" and served["adapter_sha256"] == weights
        assert served["prompt"]["name"] == "support" and served["prompt"]["version"] == str(prompt["version"])
        assert served["prompt"]["digest"] == prompt["digest"]
    # Fields the server cannot honour are refused, naming them; neutral values pass.
    for extra, param in (({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
                         ({"response_format": {"type": "json_object"}}, "response_format"),
                         ({"presence_penalty": 0.5}, "presence_penalty"), ({"frobnicate": 1}, "frobnicate")):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="support-lora", max_tokens=4, extra_body=extra,
                                           messages=[{"role": "user", "content": "hi"}])
        assert info.value.body["param"] == param, info.value.body
    ok = client.chat.completions.create(model="support-lora", max_tokens=4, presence_penalty=0, user="alice",
                                        messages=[{"role": "user", "content": "Where is my order?"}])
    assert ok.choices[0].message.content is not None


@pytest.mark.slow
def test_an_eval_through_the_chat_endpoint_scores_like_one_through_completions(example):
    project, _, _ = example
    config = project.read("llmops.yaml")
    evals = "".join(f"""  served-{api}:
    model: deployments.support-prod
    prompt: support
    dataset: tickets
    api: {api}
    metrics: [rougeL, exact_match]
    decoding: {{max_new_tokens: 24}}
""" for api in ("chat", "completions"))
    project.path("llmops.yaml").write_text(config.replace("\ndeployments:", evals + "\ndeployments:"))
    try:
        res = project.run("apply", "--auto-approve", "--select", "evals.served-chat", "--select",
                          "evals.served-completions")
        assert res.returncode == 0, res.stdout + res.stderr
        lock = project.locked()
        chat, completions = lock["evals.served-chat"]["outputs"], lock["evals.served-completions"]["outputs"]
        assert chat["rows"] == completions["rows"] > 0
        assert chat["metrics"] == completions["metrics"] and chat["metrics"]["rougeL"] >= 0.4
    finally:
        project.path("llmops.yaml").write_text(config)
    res = project.run("apply", "--auto-approve")  # the two evals leave the lock again
    assert res.returncode == 0 and "2 applied" in res.stdout, res.stdout + res.stderr


@pytest.mark.slow
def test_down_then_apply_serves_again(example):
    project, port, _ = example
    assert project.run("down", "deployments.support-prod").returncode == 0
    plan = project.run("plan", "--detailed-exitcode")
    assert plan.returncode == 2, plan.stdout
    assert "deployments.support-prod" in plan.stdout and "stopped by `llmops down`" in plan.stdout
    res = project.run("apply", "--auto-approve")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Apply complete: 1 applied." in res.stdout
    assert _get(port, "/health")["status"] == "ok"
    assert project.run("plan", "--detailed-exitcode").returncode == 0


@pytest.mark.slow
def test_versions_carry_lineage_and_a_retrain_is_priced_then_recorded(example):
    from llmops.integrations.mlflow import client

    project, _, _ = example
    mlflow = client(project.root, {})
    v1 = mlflow.get_model_version("support-lora", "1").tags
    prompt = project.locked()["prompts.support"]["outputs"]
    assert v1["llmops.prompt.version"] == str(prompt["version"]) and v1["llmops.prompt.digest"] == prompt["digest"]
    assert v1["llmops.git_dirty"] == "false" and "llmops.git_diff_sha256" not in v1
    assert v1["llmops.base_model.source"] == "build"
    assert v1["llmops.dataset.train_md5"] == project.locked()["datasets.tickets"]["outputs"]["train"]["md5"]
    before = project.locked()["finetunes.support-lora"]["outputs"]["cost"]
    assert before["device"] == "cpu" and before["tokens"] > 0 and before["wall_s"] > before["train_s"] > 0

    config = project.read("llmops.yaml")
    project.path("llmops.yaml").write_text(config.replace("learning_rate: 1.0e-2 ", "learning_rate: 8.0e-3 "))
    plan = json.loads(project.run("plan", "--json").stdout)
    change = next(c for c in plan["resource_changes"] if c["address"] == "finetunes.support-lora")
    assert change["action"] == "replace"
    estimate = change["details"]["cost"]
    assert estimate["basis"].startswith("from the last run")
    assert estimate["tokens"] == before["tokens"]  # same rows, same epochs
    assert estimate["wall_s"] == pytest.approx(before["wall_s"], rel=0.01)
    assert plan["cost"]["actions"] == 2 and plan["cost"]["tokens"] >= estimate["tokens"]
    text = project.run("plan").stdout
    assert f"cost: ~{before['tokens']:,} tokens" in text and "Estimated cost:" in text

    res = project.run("apply", "--auto-approve", "--select", "finetunes.support-lora")
    assert res.returncode == 0, res.stdout + res.stderr
    after = project.locked()["finetunes.support-lora"]["outputs"]
    assert after["model_version"] == "2" and after["cost"]["tokens"] == estimate["tokens"]
    v2 = mlflow.get_model_version("support-lora", "2").tags
    assert v2["llmops.git_dirty"] == "true" and len(v2["llmops.git_diff_sha256"]) == 64
    assert v2["llmops.git_commit"] == v1["llmops.git_commit"]

    # Promote v2, then roll back: the server serves v1's very weights again.
    _, port, _ = example
    v1_weights = _get(port, "/health")["adapter_sha256"]
    res = project.run("apply", "--auto-approve")
    assert res.returncode == 0, res.stdout + res.stderr
    health = _get(port, "/health")
    assert health["version"] == "2" and health["adapter_sha256"] == after["adapter"]["sha256"] != v1_weights
    assert project.run("rollback", "deployments.support-prod").returncode == 0
    health = _get(port, "/health")
    assert health["version"] == "1" and health["adapter_sha256"] == v1_weights
    project.path("llmops.yaml").write_text(config)
