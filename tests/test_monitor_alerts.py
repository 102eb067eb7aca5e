"""Alerts: webhook to a real HTTP receiver on 127.0.0.1 (retries, dead receiver), open_alerts,
the HTML report, and feedback export."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llmops.monitor.alerts import open_alerts, send_webhook
from llmops.monitor.errors import MonitorError
from llmops.monitor.feedback import export_feedback
from llmops.monitor.report_html import write_html_report
from llmops.monitor.runner import run_monitor
from llmops.monitor.store import SqliteStore

from test_charts import SVG, parse_svg
from test_monitor import NOW, fill, training


class Receiver:
    """A real HTTP server on 127.0.0.1 that fails the first `failures` POSTs with 500."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.bodies: list[dict] = []
        self.statuses: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = 500 if len(receiver.statuses) < receiver.failures else 200
                receiver.statuses.append(status)
                if status == 200:
                    receiver.bodies.append(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/secret-token-123"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def store(tmp_path: Path):
    s = SqliteStore(tmp_path / "log.db", log_text=True, flush_interval=0.01)
    yield s
    s.close()


def dead_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here now: connections are refused
    return f"http://127.0.0.1:{port}/hook"


def test_webhook_receives_alerts_after_two_failures(tmp_path: Path, store: SqliteStore):
    receiver = Receiver(failures=2)
    try:
        fill(store, 200, mean=60)
        spec = {"drift": {"psi_max": 0.2}, "webhook": receiver.url}
        report = run_monitor(tmp_path, "prod", spec, training(), now=NOW, store=store, webhook_backoff=0.01)
    finally:
        receiver.close()
    assert receiver.statuses == [500, 500, 200]
    assert report.webhook is not None and report.webhook["ok"] and report.webhook["attempts"] == 3
    assert "secret-token" not in json.dumps(report.to_dict())  # the URL's path is redacted
    (body,) = receiver.bodies
    assert body["deployment"] == "prod" and body["monitor"] == "prod"
    assert [a["message"] for a in body["alerts"]] == [a.message for a in report.alerts]


def test_webhook_backoff_doubles():
    receiver = Receiver(failures=10)
    sleeps: list[float] = []
    try:
        result = send_webhook(receiver.url, {"x": 1}, retries=3, backoff=0.5, sleep=sleeps.append)
    finally:
        receiver.close()
    assert sleeps == [0.5, 1.0, 2.0]
    assert (result["ok"], result["attempts"], result["status"]) == (False, 4, 500)


def test_dead_webhook_is_reported_not_raised(tmp_path: Path, store: SqliteStore):
    fill(store, 200, mean=60)
    logs: list[str] = []
    spec = {"drift": {"psi_max": 0.2}, "webhook": dead_url()}
    report = run_monitor(tmp_path, "prod", spec, training(), now=NOW, store=store, webhook_retries=2,
                         webhook_backoff=0.01, log=logs.append)
    assert report.alerts and report.webhook is not None
    assert report.webhook["ok"] is False and report.webhook["attempts"] == 3
    assert "Connection refused" in report.webhook["error"] or "refused" in report.webhook["error"].lower()
    assert logs and "failed after 3 attempts" in logs[0]
    assert open_alerts(tmp_path, "prod")  # alerts are still recorded


def test_no_webhook_call_without_alerts(tmp_path: Path, store: SqliteStore):
    receiver = Receiver()
    try:
        fill(store, 200, mean=20)
        report = run_monitor(tmp_path, "prod", {"drift": {"psi_max": 0.2}, "webhook": receiver.url}, training(),
                             now=NOW, store=store)
    finally:
        receiver.close()
    assert report.alerts == [] and report.webhook is None and receiver.statuses == []


def test_open_alerts_follow_the_latest_run(tmp_path: Path, store: SqliteStore):
    assert open_alerts(tmp_path, "prod") == []
    fill(store, 200, mean=60, prefix="a")
    spec = {"deployment": "prod", "window": 200, "drift": {"psi_max": 0.2}}
    run_monitor(tmp_path, "prod-watch", spec, training(), now=NOW, store=store)
    (alert, *_) = open_alerts(tmp_path, "prod")
    assert alert.deployment == "prod" and alert.monitor == "prod-watch"
    assert alert.message.startswith("drift: PSI ") and alert.message.endswith(" > 0.2 on prompt length")
    fill(store, 200, mean=20, prefix="b")  # traffic back to normal: the last 200 requests do not drift
    run_monitor(tmp_path, "prod-watch", spec, training(), now=NOW, store=store)
    assert open_alerts(tmp_path, "prod") == []
    assert len((tmp_path / ".llmops/alerts.jsonl").read_text().splitlines()) >= 1  # history is kept
    (tmp_path / ".llmops/monitor/prod.alerts.json").write_text("{broken")
    assert open_alerts(tmp_path, "prod") == []


def test_html_report(tmp_path: Path, store: SqliteStore):
    ids = fill(store, 300, mean=60)
    for rid in ids[:20]:
        store.add_feedback(rid, "down")
    spec = {"window": "2h", "drift": {"psi_max": 0.2}, "feedback": {"min_positive_rate": 0.5}}
    report = run_monitor(tmp_path, "prod", spec, training(), now=NOW, store=store)
    page = write_html_report(report, store, tmp_path / "report")
    text = page.read_text()
    for name in ("requests.svg", "latency.svg", "feedback.svg", "drift.svg"):
        chart = parse_svg(tmp_path / "report" / name)
        assert f'src="{name}"' in text
        if name != "drift.svg":  # 300 requests leave each bucket short of what a drift number needs
            assert chart.findall(f".//{SVG}polyline[@stroke-width]")  # the series are drawn

    def legend(name: str) -> set[str]:
        return {t.text for t in parse_svg(tmp_path / "report" / name).iter(f"{SVG}text")}

    assert {"p50", "p95"} <= legend("latency.svg") and "threshold 0.2" in legend("drift.svg")
    assert {"positive rate", "threshold 0.5"} <= legend("feedback.svg")
    for alert in report.alerts:
        assert alert.message.replace(">", "&gt;").replace("<", "&lt;") in text


def test_html_report_without_requests(tmp_path: Path, store: SqliteStore):
    report = run_monitor(tmp_path, "prod", {}, None, now=NOW, store=store)
    text = write_html_report(report, store, tmp_path / "r").read_text()
    assert "nothing to plot" in text and not list((tmp_path / "r").glob("*.svg"))


def test_export_feedback(tmp_path: Path, store: SqliteStore):
    fill(store, 4)
    store.add_feedback("r0", "up")
    store.add_feedback("r1", 2, comment="wrong", correction="The right answer.")
    store.add_feedback("r2", "down")
    store.add_feedback("r2", 5)  # the latest rating of a request counts
    out = tmp_path / "data" / "feedback.jsonl"
    assert export_feedback(store, out) == 3
    rows = {r["request_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"r0", "r1", "r2"}
    assert rows["r0"]["answer"] == "fine" and rows["r0"]["prompt"] and rows["r0"]["corrected"] is False
    assert "question" not in rows["r0"]  # logged without its prompt variables: only the text it saw
    assert rows["r1"]["answer"] == "The right answer." and rows["r1"]["corrected"] is True
    assert rows["r1"]["completion"] == "fine" and rows["r1"]["comment"] == "wrong" and rows["r1"]["rating"] == 2
    assert rows["r2"]["rating"] == 5 and rows["r2"]["positive"] is True
    # A corrected answer is a target whatever the rating (corrections come with low ratings).
    assert export_feedback(store, out, min_rating=4) == 3
    assert {json.loads(x)["request_id"] for x in out.read_text().splitlines()} == {"r0", "r1", "r2"}
    assert export_feedback(store, out, min_rating="up") == 3
    with pytest.raises(MonitorError, match="min_rating"):
        export_feedback(store, out, min_rating=9)


def test_export_rows_are_the_users_inputs_and_bad_answers_become_rejected_pairs(tmp_path: Path, store: SqliteStore):
    """Issue 12: the exported `question` is what the user asked (not the rendered prompt), a
    thumbs-down without correction is no target, and becomes the rejected side of a pair
    when a better answer for the same input exists."""
    prompt = "### Question:\n{q}\n### Answer:\n"
    asked = {"a1": "Where is my parcel?", "a2": "Where is my parcel?", "b1": "How do I log in?",
             "c1": "Can I pay by card?", "d1": "Is there a fee?"}
    said = {"a1": "It ships today.", "a2": "Bananas.", "b1": "Yes.", "c1": "Maybe.", "d1": "Nope nope."}
    for i, (rid, q) in enumerate(asked.items()):
        store.log({"id": rid, "time": NOW - 100 + i, "path": "/v1/chat/completions", "client": "c", "status": 200,
                   "prompt": [prompt.format(q=q)], "inputs": {"question": q}, "completion": [said[rid]]})
    store.flush()
    store.add_feedback("a1", "up", client_id="u1")
    store.add_feedback("a2", "down", client_id="u2")  # a better answer to the same question: a1's
    store.add_feedback("b1", "down", correction="Use Continue with Google.", client_id="u1")
    store.add_feedback("c1", "down", client_id="u3")  # no better answer anywhere: no pair
    store.add_feedback("d1", "up", client_id="u1")
    store.add_feedback("d1", "down", client_id="u4")  # two clients disagree: each rating is a row
    out, pairs = tmp_path / "sft.jsonl", tmp_path / "pairs.jsonl"
    assert export_feedback(store, out, pairs=pairs) == 3
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["question"], r["answer"], r["client"]) for r in rows] == [
        ("Where is my parcel?", "It ships today.", "u1"), ("How do I log in?", "Use Continue with Google.", "u1"),
        ("Is there a fee?", "Nope nope.", "u1")]
    assert rows[1]["corrected"] is True and rows[1]["completion"] == "Yes." and rows[1]["positive"] is False
    assert all(r["prompt"] == prompt.format(q=r["question"]) for r in rows)
    made = [json.loads(x) for x in pairs.read_text().splitlines()]
    # d1's answer is both liked and disliked: no pair of an answer against itself; c1 has nothing better.
    assert [(m["question"], m["chosen"], m["rejected"]) for m in made] == [
        ("Where is my parcel?", "It ships today.", "Bananas."), ("How do I log in?", "Use Continue with Google.", "Yes.")]
    assert all(set(m) == {"question", "prompt", "chosen", "rejected", "request_id"} for m in made)
    assert all(m["chosen"] != m["rejected"] for m in made)


def test_export_without_logged_texts_says_how_to_fix(tmp_path: Path):
    store = SqliteStore(tmp_path / "t.db", log_text=False, flush_interval=0.01)
    fill(store, 2)
    store.add_feedback("r0", "up")
    with pytest.raises(MonitorError, match="log_text: true"):
        export_feedback(store, tmp_path / "f.jsonl")
    assert not (tmp_path / "f.jsonl").exists()
    store.close()
