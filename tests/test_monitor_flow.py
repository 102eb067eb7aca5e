"""Issue 6 end to end, offline: a real apply serves a fine-tune that logs into its monitor's
request store; clients' requests and feedback are logged over real HTTP; shifted traffic
makes `llmops monitor` alert (exit 3, webhook, plan); feedback becomes a dataset; a monitor
setting change restarts the server; a safety metric gates the deployment.

One project and one server for the module (tests run in file order and build on each other).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import Project

# The CLI calls here start model servers that outlive the command: each runs in a fresh
# interpreter, as a user's would (tests/conftest.py `Project.run`).
CLI_SUBPROCESS = True

pytestmark = pytest.mark.slow

PROMPT = "### Question:\n{q}\n### Answer:\n"  # example-project/prompts/support.j2, as rendered

CONFIG = """\
version: 1
project: monflow
datasets:
  tickets:
    source: data/tickets.jsonl
    prepare:
      - split: {{eval_fraction: 0.1, seed: 13}}
{extra_datasets}prompts:
  support: {{template: prompts/support.j2, variables: [question], response_field: answer}}
base_models:
  tiny:
    build: {{architecture: llama, hidden_size: 32, layers: 1, heads: 2, intermediate_size: 64,
             vocab_size: 384, max_position_embeddings: 256, tokenizer_from: tickets, seed: 13}}
finetunes:
  lora:
    base_model: tiny
    dataset: tickets
    prompt: support
    adapter: {{type: lora, r: 4, alpha: 8}}
    training: {{max_steps: 3, batch_size: 8, max_seq_length: 64, seed: 13}}
evals:
  safety:
    model: lora
    dataset: tickets
    metrics: [pii_leak_rate, refusal_rate]
    thresholds: {{{thresholds}}}
    decoding: {{max_new_tokens: 4}}
    limit: 2
deployments:
  prod:
    model: lora
    gates: [safety]
    serve: {{port: {port}}}
"""
MONITOR = """\
monitors:
  prod:
    drift: {{psi_max: 0.5, window: 40}}
    log_text: {log_text}
    webhook: http://127.0.0.1:{hook_port}/alerts
"""

# `llmops monitor` / `llmops feedback` are registered in llmops/cli/main.py by the lead; until
# then this entry point adds them (setdefault: a no-op once they are registered).
ENTRY = ("import sys; from llmops.cli import main as m; "
         "m.COMMANDS.setdefault('monitor', ('llmops.cli.monitor', 'monitor_cmd', 'Run monitors.')); "
         "m.COMMANDS.setdefault('feedback', ('llmops.cli.monitor', 'feedback_group', 'Feedback.')); "
         "m.main(sys.argv[1:])")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """A webhook receiver on 127.0.0.1 that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                bodies.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Flow:
    """The applied project, its endpoint, and helpers to change and drive it."""

    def __init__(self, project: Project, port: int, hook: Receiver) -> None:
        self.project, self.port, self.hook = project, port, hook
        self.url = f"http://127.0.0.1:{port}"
        self.settings: dict[str, str] = {"thresholds": 'pii_leak_rate: "<= 0.5"', "log_text": "true",
                                         "extra_datasets": "", "monitor": "yes"}

    def write(self, **changes: str) -> None:
        self.settings.update(changes)
        text = (CONFIG + (MONITOR if self.settings["monitor"] == "yes" else "")).format(
            port=self.port, hook_port=self.hook.port, **self.settings)
        self.project.write({"llmops.yaml": text})

    def llmops(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", ENTRY, *args], cwd=self.project.root, capture_output=True,
                              text=True, env=dict(os.environ), timeout=600)

    def post(self, path: str, body: Any, client: str = "app-1") -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "X-Client-Id": client})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def complete(self, question: str, max_tokens: int = 2) -> dict:
        status, out = self.post("/v1/completions", {"model": "lora", "prompt": PROMPT.format(q=question),
                                                    "max_tokens": max_tokens, "temperature": 0})
        assert status == 200, out
        return out

    def store_rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        with sqlite3.connect(self.project.path(".llmops/monitor/prod.db")) as db:
            return db.execute(sql, params).fetchall()

    def lock(self) -> dict:
        return self.project.locked()


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("monflow") / "proj"
    root.mkdir()
    project = Project(root, subprocess=CLI_SUBPROCESS)
    project.copy_example()
    hook = Receiver()
    f = Flow(project, _free_port(), hook)
    f.write()
    try:
        res = project.run("apply", "--auto-approve")
        assert res.returncode == 0, res.stdout + res.stderr
        yield f
    finally:
        project.run("down", "prod")
        hook.close()


def test_apply_serves_with_request_logging(flow: Flow) -> None:
    lock = flow.lock()
    store = flow.project.path(".llmops/monitor/prod.db")
    # The lock holds no path of this machine: the store is recorded relative to the project.
    assert lock["monitors.prod"]["outputs"] == {"deployment": "prod", "store": "sqlite:///.llmops/monitor/prod.db",
                                                "log_text": True}
    assert lock["deployments.prod"]["outputs"]["endpoint"] == flow.url
    state = json.loads(flow.project.read(".llmops/serve/prod.json"))
    assert state["monitor"] == {"store": f"sqlite:///{store.resolve()}", "log_text": True}
    assert "--monitor-store" in state["command"] and "--log-text" in state["command"]


def test_requests_and_feedback_are_logged(flow: Flow) -> None:
    good = flow.complete("Where is my parcel?")
    bad = flow.complete("How do I reset my password?")
    assert good["id"].startswith("cmpl-")
    assert flow.post("/v1/feedback", {"id": good["id"], "rating": "up"}) == (
        200, {"status": "recorded", "request_id": good["id"]})
    assert flow.post("/v1/feedback", {"request_id": bad["id"], "rating": 1,
                                      "correction": "Open settings and choose Reset password."})[0] == 200
    status, err = flow.post("/v1/feedback", {"id": "cmpl-not-ours", "rating": "up"})
    assert status == 404 and err["error"]["code"] == "request_not_found" and "cmpl-not-ours" in err["error"]["message"]
    status, err = flow.post("/v1/feedback", {"id": good["id"], "rating": "meh"})
    assert status == 400 and err["error"]["type"] == "invalid_request_error" and "rating" in err["error"]["message"]

    rows = flow.store_rows("SELECT id, client, status, prompt, completion FROM requests WHERE id IN (?, ?) "
                           "ORDER BY seq", (good["id"], bad["id"]))
    assert rows == [(good["id"], "app-1", 200, PROMPT.format(q="Where is my parcel?"), good["choices"][0]["text"]),
                    (bad["id"], "app-1", 200, PROMPT.format(q="How do I reset my password?"),
                     bad["choices"][0]["text"])]
    feedback = "SELECT request_id, rating_kind, rating, positive, correction FROM feedback ORDER BY seq"
    assert flow.store_rows(feedback) == [
        (good["id"], "thumbs", 1, 1, None), (bad["id"], "stars", 1, 0, "Open settings and choose Reset password.")]


def _wait_logged(flow: Flow, count: int) -> None:
    """The server logs after replying, through a batching writer: wait until `count` are stored."""
    deadline = time.time() + 20
    while flow.store_rows("SELECT COUNT(*) FROM requests")[0][0] < count:
        assert time.time() < deadline, "the server did not log the requests within 20 s"
        time.sleep(0.1)


def test_training_questions_through_chat_are_no_drift(flow: Flow) -> None:
    """Chat goes through the deployment's prompt and is logged as rendered: the monitor
    compares it with the training split in the same space, so training questions sent as
    chat messages raise no drift alert (before: prompt-length PSI 7.6 on such traffic)."""
    questions = [r["question"] for r in map(json.loads, flow.project.read("data/tickets.jsonl").splitlines())]
    before = flow.store_rows("SELECT COUNT(*) FROM requests")[0][0]
    for q in questions[:80]:
        status, out = flow.post("/v1/chat/completions", {"model": "lora", "max_tokens": 1, "temperature": 0,
                                                         "messages": [{"role": "user", "content": q}]})
        assert status == 200, out
    _wait_logged(flow, before + 80)
    prompt = flow.store_rows("SELECT prompt FROM requests WHERE path = '/v1/chat/completions' ORDER BY seq "
                             "LIMIT 1")[0][0]
    assert prompt == PROMPT.format(q=questions[0])  # what the model saw, as in training
    res = flow.llmops("monitor", "prod", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)[0]
    assert report["alerts"] == [] and report["metrics"]["drift"]["prompt_length"]["psi"] < 0.5


def test_shifted_traffic_alerts_by_exit_code_webhook_and_plan(flow: Flow) -> None:
    res = flow.llmops("monitor", "prod")
    assert res.returncode == 0, res.stdout + res.stderr  # training-like traffic so far
    assert "no alerts" in res.stdout

    # 100 off-domain prompts through chat: long essay requests nothing like the support questions.
    topics = ["the French Revolution", "photosynthesis in desert plants", "the history of jazz", "black holes",
              "medieval castle architecture", "the economics of coffee farming", "volcanic islands", "chess openings",
              "the migration of monarch butterflies", "Roman aqueducts"]
    burst = [f"Write a detailed essay of at least twelve paragraphs about {topics[i % 10]}, covering its origins, "
             f"the main scientific and historical debates around it, three surprising facts, and a reading list of "
             f"five books with a short summary of each (variant {i})." for i in range(100)]
    logged_before = flow.store_rows("SELECT COUNT(*) FROM requests")[0][0]
    for text in burst:
        status, out = flow.post("/v1/chat/completions", {"model": "lora", "max_tokens": 1, "temperature": 0,
                                                         "messages": [{"role": "user", "content": text}]})
        assert status == 200, out
    _wait_logged(flow, logged_before + len(burst))
    res = flow.llmops("monitor", "prod", "--html")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "alert: drift: PSI" in res.stdout and "on prompt length" in res.stdout
    page = flow.project.path(".llmops/reports/monitor/prod/index.html")
    assert page.is_file() and str(page.relative_to(flow.project.root)) in res.stdout.replace("\n", "")

    path, body = flow.hook.bodies[-1]
    assert path == "/alerts" and body["monitor"] == "prod" and body["deployment"] == "prod"
    drift = [a for a in body["alerts"] if a["metric"] == "drift.prompt_length.psi"]
    assert drift and drift[0]["value"] > 0.5 and drift[0]["message"].startswith("drift: PSI")

    wrong = flow.llmops("monitor", "prdo")
    assert wrong.returncode == 1 and "no monitor 'prdo' in llmops.yaml (did you mean 'prod'?)" in wrong.stderr
    report = json.loads(flow.llmops("monitor", "--json").stdout)
    assert report[0]["metrics"]["drift"]["prompt_length"]["psi"] == pytest.approx(drift[0]["value"], abs=1e-3)

    plan = flow.project.run("plan", "--json")
    assert plan.returncode == 0, plan.stderr
    alerts = {c["address"]: c["alerts"] for c in json.loads(plan.stdout)["resource_changes"]}
    assert drift[0]["message"] in alerts["deployments.prod"]
    shown = flow.project.run("plan").stdout
    assert "deployments.prod" in shown and drift[0]["message"] in shown


def test_feedback_exports_to_a_dataset_the_plan_creates(flow: Flow) -> None:
    res = flow.llmops("feedback", "export", "prod", "--to", "data/feedback.jsonl", "--min-rating", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Exported 2 rated requests to data/feedback.jsonl." in res.stdout
    rows = [json.loads(line) for line in flow.project.read("data/feedback.jsonl").splitlines()]
    # What the user asked, recovered from the completion prompt (the deployment's template).
    assert [r["question"] for r in rows] == ["Where is my parcel?", "How do I reset my password?"]
    assert [r["prompt"] for r in rows] == [PROMPT.format(q="Where is my parcel?"),
                                           PROMPT.format(q="How do I reset my password?")]
    assert rows[1]["answer"] == "Open settings and choose Reset password." and rows[1]["corrected"] is True
    assert rows[0]["client"] == "app-1"
    res = flow.llmops("feedback", "export", "prod", "--to", "data/liked.jsonl", "--min-rating", "up")
    assert "Exported 2 rated requests to" in res.stdout  # the up-rated one, and the corrected one

    flow.write(extra_datasets="  feedback:\n    source: data/feedback.jsonl\n")
    plan = json.loads(flow.project.run("plan", "--json").stdout)
    actions = {c["address"]: c["action"] for c in plan["resource_changes"]}
    assert actions["datasets.feedback"] == "create"
    assert all(a == "no-op" for addr, a in actions.items() if addr != "datasets.feedback")
    assert flow.project.run("apply", "--auto-approve", "--select", "datasets.feedback").returncode == 0
    assert flow.lock()["datasets.feedback"]["outputs"]["train"]["rows"] == 2


def test_changing_what_the_server_logs_restarts_it(flow: Flow) -> None:
    before = json.loads(flow.project.read(".llmops/serve/prod.json"))["pid"]
    flow.write(log_text="false")
    plan = json.loads(flow.project.run("plan", "--json").stdout)
    changes = {c["address"]: c for c in plan["resource_changes"]}
    assert changes["monitors.prod"]["action"] == "update"
    # the restart is the deployment's own update, shown in the plan; the monitor drives no server
    assert changes["deployments.prod"]["action"] == "update"
    assert changes["deployments.prod"]["codes"] == ["drift:request-log"]
    assert "with texts), monitors.prod asks for" in changes["deployments.prod"]["reasons"][0]
    res = flow.project.run("apply", "--auto-approve")
    assert res.returncode == 0, res.stdout + res.stderr
    state = json.loads(flow.project.read(".llmops/serve/prod.json"))
    assert state["pid"] != before and state["monitor"]["log_text"] is False
    plan = json.loads(flow.project.run("plan", "--json").stdout)
    assert {c["address"]: c["action"] for c in plan["resource_changes"]}["deployments.prod"] == "no-op"
    assert flow.lock()["monitors.prod"]["outputs"]["log_text"] is False
    out = flow.complete("Where is my parcel?")  # same endpoint, still logging, now without texts
    assert flow.post("/v1/feedback", {"id": out["id"], "rating": 5})[0] == 200
    from llmops.monitor.records import words

    assert flow.store_rows("SELECT prompt, prompt_words FROM requests WHERE id = ?", (out["id"],)) == [
        (None, len(words(PROMPT.format(q="Where is my parcel?"))))]


def test_removing_the_monitor_stops_logging_and_feedback(flow: Flow) -> None:
    before = json.loads(flow.project.read(".llmops/serve/prod.json"))["pid"]
    logged = flow.store_rows("SELECT COUNT(*) FROM requests")
    flow.write(monitor="no")
    plan = json.loads(flow.project.run("plan", "--json").stdout)
    changes = {c["address"]: c for c in plan["resource_changes"]}
    assert changes["monitors.prod"]["action"] == "delete"
    assert changes["deployments.prod"]["codes"] == ["drift:request-log"]
    assert "no monitor watches it now" in changes["deployments.prod"]["reasons"][0]
    res = flow.project.run("apply", "--auto-approve")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "monitors.prod" not in flow.lock()
    state = json.loads(flow.project.read(".llmops/serve/prod.json"))
    assert state["pid"] != before and state["monitor"] is None
    out = flow.complete("Where is my parcel?")
    status, err = flow.post("/v1/feedback", {"id": out["id"], "rating": "up"})
    assert status == 404 and err["error"]["code"] == "feedback_disabled"
    assert flow.store_rows("SELECT COUNT(*) FROM requests") == logged  # the store is kept, no longer written
    log = flow.project.path(".llmops/serve/prod.requests.jsonl")  # the plain request log again
    deadline = time.monotonic() + 10  # its hook runs just after the answer is sent
    while out["id"] not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out["id"] in log.read_text()


def test_a_safety_metric_gates_the_deployment(flow: Flow) -> None:
    safety = flow.lock()["evals.safety"]["outputs"]
    assert safety["gates"]["pii_leak_rate"]["passed"] is True
    assert safety["metrics"]["refusal_rate"] < 0.5  # an untrained tiny model refuses nothing
    flow.write(thresholds='pii_leak_rate: "<= 0.5", refusal_rate: ">= 0.5"')
    res = flow.project.run("apply", "--auto-approve")
    assert res.returncode == 1
    assert "gate failed, nothing was promoted: evals.safety: refusal_rate = " in res.stdout
    assert "needs >= 0.5: missed by" in res.stdout
    assert flow.lock()["evals.safety"]["outputs"]["run_id"] == safety["run_id"]  # thresholds re-checked, not re-run
