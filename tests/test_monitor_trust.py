"""Monitoring you can trust (issue 12, item 4), through the real CLI on real SQLite stores:
repeated ratings count once per (response, client); refused requests count as errors; the
webhook (a real HTTP receiver on 127.0.0.1) hears an alert once, again only when it changes
or resolves; `webhook_env` keeps the URL out of llmops.yaml and llmops.lock; a rate spike is
found in the first window; stores made before feedback had a client are migrated."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import Project

from llmops.monitor.store import SqliteStore

PROMPT = "### Question:\n{q}\n### Answer:\n"  # example-project/prompts/support.j2, as rendered
CONFIG = """\
version: 1
project: trust
datasets:
  tickets:
    source: data/tickets.jsonl
prompts:
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
    training: {{max_steps: 1, batch_size: 8, max_seq_length: 64, seed: 13}}
deployments:
  prod:
    model: lora
monitors:
  prod:
{monitor}
"""
NOW = float(int(time.time()) // 60 * 60)  # `llmops monitor` runs now; on a minute, so a burst fits in one
TOKEN = "trust-token"


class Receiver:
    """A webhook receiver on 127.0.0.1 keeping every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T0-secret-path-4711"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def make_project(root: Path, monitor: str) -> Project:
    project = Project(root).copy_example()
    project.write({"llmops.yaml": CONFIG.format(monitor="\n".join("    " + line for line in monitor.splitlines()))})
    return project


def store_of(project: Project, **kwargs: Any) -> SqliteStore:
    return SqliteStore(project.path(".llmops/monitor/prod.db"), flush_interval=0.01, **kwargs)


def monitor(project: Project, env: dict[str, str] | None = None) -> tuple[int, list[dict[str, Any]], str]:
    """`llmops monitor --json` (the real entry point): exit code, reports, stderr."""
    res = project.run("monitor", "--json", env=env)
    assert res.returncode in (0, 3), res.stdout + res.stderr
    return res.returncode, json.loads(res.stdout), res.stderr


def log_requests(store: SqliteStore, n: int, *, prefix: str = "r", client: str = "app", status: int = 200,
                 start: float = NOW - 3600, step: float = 1.0) -> list[str]:
    ids = [f"{prefix}{i}" for i in range(n)]
    for i, rid in enumerate(ids):
        store.log({"id": rid, "time": start + i * step, "path": "/v1/completions", "client_id": client,
                   "status": status, "latency_ms": 20.0, "prompt": ["Where is my order?"], "completion": ["x"]})
    store.flush()
    return ids


# --- ratings -------------------------------------------------------------------------------

def test_thirty_identical_ratings_from_one_client_count_once(tmp_path: Path):
    project = make_project(tmp_path, "feedback: {min_positive_rate: 0.6, min_count: 5}")
    store = store_of(project)
    ids = log_requests(store, 10)
    for i, rid in enumerate(ids[1:10]):  # 9 honest clients: 4 up, 5 down (44% positive)
        store.add_feedback(rid, "up" if i < 4 else "down", client_id=f"user-{i}")
    store.close()
    code, (before,), _ = monitor(project)
    assert code == 3 and before["metrics"]["feedback"]["positive_rate"] == pytest.approx(4 / 9, abs=1e-6)

    store = store_of(project)
    for _ in range(30):  # one client floods one response with "up"
        store.add_feedback(ids[0], "up", client_id="spammer")
    store.close()
    code, (report,), _ = monitor(project)
    fb = report["metrics"]["feedback"]
    assert (fb["count"], fb["positive"], fb["superseded"], fb["clients"]) == (10, 5, 29, 10)
    assert code == 3 and [a["check"] for a in report["alerts"]] == ["feedback"]  # 50% < 60%: still alerting
    with sqlite3.connect(project.path(".llmops/monitor/prod.db")) as db:  # the spam is traceable
        assert db.execute("SELECT client, COUNT(*) FROM feedback WHERE request_id = ? GROUP BY client",
                          (ids[0],)).fetchall() == [("spammer", 30)]

    store = store_of(project)
    store.add_feedback(ids[0], "down", client_id="spammer")  # the latest rating of a client wins
    store.close()
    fb = monitor(project)[1][0]["metrics"]["feedback"]
    assert (fb["count"], fb["positive"]) == (10, 4)


# --- the real server: refusals and feedback over HTTP ------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    from llmops.serve.model import load_model
    from llmops.train.build import build_tiny_model

    texts = ["How do I reset my password? Open settings.", "Where is my order? It ships in two days."] * 8
    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model({"hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64, "vocab_size": 300,
                      "max_position_embeddings": 128, "seed": 0}, texts, out)
    return load_model(out)


class Served:
    """The real HTTP server (tiny model, bearer token) logging into a project's store."""

    def __init__(self, lm: Any, store: SqliteStore) -> None:
        from llmops.serve.main import feedback_hook
        from llmops.serve.openai_api import RequestLimits
        from llmops.serve.server import make_server
        from llmops.serve.service import ModelService

        self.server = make_server(ModelService(lm, RequestLimits(max_tokens=8)), "127.0.0.1", 0, "lora", TOKEN,
                                  store, feedback=feedback_hook(store))
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def post(self, path: str, body: Any, token: str | None = TOKEN, client: str = "app-1") -> tuple[int, Any]:
        headers = {"Content-Type": "application/json", "X-Client-Id": client}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_twenty_rejected_requests_raise_the_error_rate_alert(tmp_path: Path, tiny_model: Any):
    project = make_project(tmp_path, "error_rate_max: 0.1")
    store = store_of(project)
    served = Served(tiny_model, store)
    try:
        body = {"model": "lora", "prompt": PROMPT.format(q="Where is my parcel?"), "max_tokens": 1}
        for _ in range(80):
            assert served.post("/v1/completions", body)[0] == 200
        refused = [served.post("/v1/completions", body, token=None)[0] for _ in range(15)]  # no API key
        refused += [served.post("/v1/completions", {**body, "max_tokens": "many"})[0] for _ in range(5)]
    finally:
        served.close()
        store.close()
    assert refused == [401] * 15 + [400] * 5
    code, (report,), _ = monitor(project)
    assert report["metrics"]["requests"]["count"] == 100  # the server logged its refusals
    assert (report["metrics"]["requests"]["errors"], report["metrics"]["requests"]["client_errors"]) == (20, 20)
    assert report["metrics"]["error_rate"] == pytest.approx(0.2)
    (alert,) = report["alerts"]
    assert code == 3 and alert["check"] == "error_rate"
    assert alert["message"] == "errors: error rate 20.00% > 10.00% (20 refused 4xx, 0 failed 5xx or cut off)"


def test_thirty_ratings_over_http_on_one_response_count_once(tmp_path: Path, tiny_model: Any):
    project = make_project(tmp_path, "feedback: {min_positive_rate: 0.5}")
    store = store_of(project)
    served = Served(tiny_model, store)
    try:
        body = {"model": "lora", "prompt": PROMPT.format(q="Where is my parcel?"), "max_tokens": 1}
        answer = served.post("/v1/completions", body)[1]
        for _ in range(30):
            assert served.post("/v1/feedback", {"id": answer["id"], "rating": "up"})[0] == 200
        # Another client's rating of the same answer is its own: the server records who rated.
        assert served.post("/v1/feedback", {"id": answer["id"], "rating": "down"}, client="app-2")[0] == 200
    finally:
        served.close()
        store.close()
    fb = monitor(project)[1][0]["metrics"]["feedback"]
    assert (fb["count"], fb["positive"], fb["superseded"], fb["clients"]) == (2, 1, 29, 2)


# --- alert state and the webhook ---------------------------------------------------------------

def test_a_second_monitor_run_with_nothing_new_sends_no_webhook_call(tmp_path: Path, receiver: Receiver):
    project = make_project(tmp_path, f"window: 100\nerror_rate_max: 0.1\nwebhook: {receiver.url}")
    store = store_of(project)
    log_requests(store, 80, prefix="ok")
    log_requests(store, 20, prefix="refused", status=401, start=NOW - 1000)
    store.close()

    code, (first,), _ = monitor(project)
    assert code == 3 and first["webhook"]["ok"] and first["webhook"]["changes"] == 1
    (body,) = receiver.bodies
    assert [(c["change"], c["check"], c["state"]) for c in body["changes"]] == [("opened", "error_rate", "open")]
    assert [a["message"] for a in body["alerts"]] == [a["message"] for a in first["alerts"]]

    code, (second,), _ = monitor(project)  # nothing new: the alert is still open, the receiver knows it
    assert code == 3 and second["alerts"] and second["webhook"] is None and len(receiver.bodies) == 1
    assert second["alerts"][0]["opened"] == first["alerts"][0]["opened"]
    shown = project.run("monitor")
    assert shown.returncode == 3 and "nothing new since its last call" in shown.stdout and len(receiver.bodies) == 1

    store = store_of(project)
    log_requests(store, 10, prefix="more-refused", status=503, start=NOW - 500)  # 30% now: the alert changed
    store.close()
    assert monitor(project)[0] == 3 and len(receiver.bodies) == 2
    assert [c["change"] for c in receiver.bodies[1]["changes"]] == ["changed"]

    store = store_of(project)
    log_requests(store, 100, prefix="fine", start=NOW - 100, step=0.5)  # the last 100 requests are fine
    store.close()
    code, (resolved,), _ = monitor(project)
    assert code == 0 and resolved["alerts"] == [] and len(receiver.bodies) == 3
    (change,) = receiver.bodies[2]["changes"]
    assert (change["change"], change["state"], change["check"]) == ("resolved", "resolved", "error_rate")
    assert receiver.bodies[2]["alerts"] == []
    assert monitor(project)[0] == 0 and len(receiver.bodies) == 3  # resolved once, then quiet
    history = [json.loads(line) for line in project.read(".llmops/alerts.jsonl").splitlines()]
    assert [h["change"] for h in history] == ["opened", "changed", "resolved"]


@pytest.mark.slow
def test_webhook_env_reads_the_url_from_the_environment_and_keeps_it_out_of_the_lock(
        tmp_path: Path, receiver: Receiver):
    project = make_project(tmp_path, "error_rate_max: 0.1\nwebhook_env: TRUST_HOOK_URL")
    env = {"TRUST_HOOK_URL": receiver.url}
    res = project.run("apply", "--auto-approve", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    store = store_of(project)
    log_requests(store, 5, status=500)
    store.close()

    code, (report,), stderr = monitor(project, env={"TRUST_HOOK_URL": ""})  # not set where the monitor runs
    assert code == 3 and report["webhook"]["ok"] is False and "TRUST_HOOK_URL" in report["webhook"]["error"]
    assert "which is empty or not set" in stderr and receiver.bodies == []

    code, (report,), _ = monitor(project, env=env)  # the unsent alert goes out once the URL is there
    assert code == 3 and report["webhook"]["ok"] and len(receiver.bodies) == 1
    assert receiver.bodies[0]["changes"][0]["check"] == "error_rate"
    assert monitor(project, env=env)[0] == 3 and len(receiver.bodies) == 1
    secret = "T0-secret-path-4711"
    for rel in ("llmops.lock", "llmops.yaml", ".llmops/monitor/prod.alerts.json", ".llmops/alerts.jsonl"):
        assert secret not in project.read(rel), rel
    assert project.locked()["monitors.prod"]["spec"]["webhook_env"] == "TRUST_HOOK_URL"
    assert secret not in json.dumps(report)


def test_webhook_and_webhook_env_together_are_refused(tmp_path: Path):
    project = make_project(tmp_path, "webhook: http://127.0.0.1:9/x\nwebhook_env: TRUST_HOOK_URL")
    res = project.run("monitor")
    assert res.returncode == 1 and "sets both `webhook` and `webhook_env`" in res.stderr


# --- rate spikes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suspicious, spike", [("{}", True), ("{baseline_per_min: 20}", False)])
def test_rate_spike_from_the_first_window(tmp_path: Path, suspicious: str, spike: bool):
    project = make_project(tmp_path, f"window: 1000\nsuspicious: {suspicious}")
    store = store_of(project)  # a fresh store: nothing came before the window
    log_requests(store, 60, prefix="steady", client="steady", start=NOW - 3600, step=60)  # one a minute
    log_requests(store, 120, prefix="burst", client="burst", start=NOW - 600, step=0.25)  # 120 in 30 s
    log_requests(store, 300, prefix="busy", client="busy", start=NOW - 3000, step=10)  # six a minute, always
    store.close()
    code, (report,), _ = monitor(project)
    found = {c["client"]: c for c in report["metrics"]["suspicious_clients"]}
    if not spike:  # 120 < 10 x 20/min: a configured baseline allows bursts of this size
        assert code == 0 and found == {}
        return
    assert code == 3 and set(found) == {"burst"}
    assert found["burst"]["peak_per_minute"] == 120 and found["burst"]["usual_per_minute"] == 0.0
    (alert,) = report["alerts"]
    assert alert["message"].startswith("suspicious client burst: rate spike: 120 requests in one minute")
    assert alert["key"] == "suspicious:suspicious_clients:burst"


# --- stores made before feedback had a client ---------------------------------------------------

def test_an_old_store_gains_the_client_column_and_keeps_its_feedback(tmp_path: Path):
    project = make_project(tmp_path, "feedback: {min_positive_rate: 0.5}")
    path = project.path(".llmops/monitor/prod.db")
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as db:  # the schema 1 tables as llmops wrote them before
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        db.execute("CREATE TABLE requests (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, ts REAL NOT NULL, client TEXT, "
                   "path TEXT, status INTEGER, error TEXT, latency_ms REAL, prompt_tokens INTEGER, "
                   "completion_tokens INTEGER, prompt_chars INTEGER, prompt_words INTEGER, injection INTEGER, "
                   "token_bag BLOB, prompt TEXT, completion TEXT)")
        db.execute("CREATE TABLE feedback (seq INTEGER PRIMARY KEY, request_id TEXT NOT NULL, ts REAL NOT NULL, "
                   "rating_kind TEXT NOT NULL, rating INTEGER NOT NULL, positive INTEGER NOT NULL, comment TEXT, "
                   "correction TEXT)")
        db.execute("INSERT INTO requests (id, ts, client, path, status) VALUES ('old', ?, 'app', "
                   "'/v1/completions', 200)", (NOW - 10,))
        db.execute("INSERT INTO feedback (request_id, ts, rating_kind, rating, positive) VALUES "
                   "('old', ?, 'thumbs', 0, 0)", (NOW - 5,))
    code, (report,), _ = monitor(project)  # opening the store migrates it
    assert code == 3 and report["metrics"]["feedback"]["count"] == 1
    store = store_of(project)
    store.add_feedback("old", "up", client_id="alice")
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT rating, client FROM feedback ORDER BY seq").fetchall() == [(0, None), (1, "alice")]
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [("1",)]
    fb = monitor(project)[1][0]["metrics"]["feedback"]
    assert (fb["count"], fb["positive"]) == (2, 1)  # an anonymous rating and alice's
