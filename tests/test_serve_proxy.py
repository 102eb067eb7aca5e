"""The logging proxy of `serve.engine: vllm` (llmops/serve/proxy.py), for real, on loopback.

The upstream is a real OpenAI-compatible server: our built-in `python -m llmops.serve` serving
a tiny random Llama built here (no vLLM image can be pulled on this machine; the proxy only
speaks OpenAI's HTTP API, which both serve). The upstream wants a key of its own, which only
the proxy knows, as the vLLM container's key works. The proxy runs as the background process
`start_server(..., module="llmops.serve.proxy")` starts, logging into a real SQLite request
store; clients are the real `openai` package and plain urllib.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

MODEL = "tiny-support"
CLIENT_TOKEN = "client-token-abc"
UPSTREAM_KEY = "upstream-key-xyz"
CLIENT_TOKEN_ENV = "LLMOPS_TEST_PROXY_TOKEN"
UPSTREAM_TOKEN_ENV = "LLMOPS_TEST_UPSTREAM_TOKEN"
TEXTS = [
    "How do I reset my password? Open settings and choose reset password.",
    "Where is my order? Orders ship within two days of purchase.",
    "Can I get a refund? Refunds are possible within thirty days.",
] * 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
BUILD = {"hidden_size": 32, "layers": 2, "heads": 4, "intermediate_size": 64, "vocab_size": 300,
         "max_position_embeddings": 128, "seed": 0}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """The built-in server (upstream, key-protected) and the proxy in front of it."""
    from transformers import AutoTokenizer

    from llmops.serve.control import stop_server
    from llmops.serve.process import start_server, wait_healthy
    from llmops.train.build import build_tiny_model

    root = tmp_path_factory.mktemp("proxy")
    model_dir = root / "model"
    build_tiny_model(BUILD, TEXTS, model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(model_dir))
    saved = {k: os.environ.get(k) for k in (CLIENT_TOKEN_ENV, UPSTREAM_TOKEN_ENV)}
    os.environ[CLIENT_TOKEN_ENV], os.environ[UPSTREAM_TOKEN_ENV] = CLIENT_TOKEN, UPSTREAM_KEY
    state = root / "state"
    store_url = f"sqlite:///{root / 'monitor.db'}"
    up = start_server(state, "upstream", model_dir, model_name=MODEL, auth_token_env=UPSTREAM_TOKEN_ENV)
    proxy = None
    try:
        wait_healthy(up.url, timeout=180, handle=up)
        proxy = start_server(state, "prod", model_dir, model_name=MODEL, auth_token_env=CLIENT_TOKEN_ENV,
                             monitor_store=store_url, log_text=True, module="llmops.serve.proxy",
                             extra_args=["--upstream", up.url], env={"LLMOPS_UPSTREAM_API_KEY": UPSTREAM_KEY})
        health = wait_healthy(proxy.url, timeout=60, handle=proxy)
        yield {"up": up, "proxy": proxy, "health": health, "store": store_url, "root": root}
    finally:
        if proxy is not None:
            stop_server(proxy.state_file)
        stop_server(up.state_file)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def client(url: str, key: str, **kw: Any):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)


def post(url: str, path: str, body: Any, token: str | None = CLIENT_TOKEN,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def rows(store_url: str, sql: str, params: tuple = ()) -> list[tuple]:
    from llmops.monitor.store import open_store

    with open_store(store_url) as store:
        return store.query(sql, params)


def test_health_names_the_proxy_and_the_process_state_knows_it(served: dict) -> None:
    from llmops.serve.control import server_status

    health = served["health"]
    assert (health["status"], health["model"], health["engine"]) == ("ok", MODEL, "vllm")
    assert health["instance"] == served["proxy"].instance and health["pid"] == served["proxy"].pid
    status = server_status(served["proxy"].state_file, probe=True)
    assert (status.running, status.healthy) == (True, True)


def test_openai_client_through_the_proxy_gets_the_upstreams_answers(served: dict) -> None:
    openai = pytest.importorskip("openai")
    via = client(served["proxy"].url, CLIENT_TOKEN)
    direct = client(served["up"].url, UPSTREAM_KEY)
    assert [m.id for m in via.models.list()] == [m.id for m in direct.models.list()] == [MODEL]
    kw = dict(model=MODEL, prompt="Where is my order?", max_tokens=6, temperature=0)
    assert via.completions.create(**kw).choices[0].text == direct.completions.create(**kw).choices[0].text
    messages = [{"role": "user", "content": "Can I get a refund?"}]
    chat = via.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == direct.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0).choices[0].message.content
    stream = via.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    # The upstream's 4xx passes through as it is (its message and status).
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        via.completions.create(model=MODEL, prompt="x", max_tokens=1000)
    with pytest.raises(openai.NotFoundError):  # only the deployment's model is forwarded
        via.completions.create(model="tiny-support-base", prompt="x", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):  # the upstream's key is not the clients'
        client(served["proxy"].url, UPSTREAM_KEY).completions.create(**kw)


def test_requests_reach_the_store_with_client_ids_and_feedback_works(served: dict) -> None:
    url, store = served["proxy"].url, served["store"]
    status, out = post(url, "/v1/completions", {"model": MODEL, "prompt": "Where is my order?", "max_tokens": 3},
                       headers={"X-Client-Id": "web-42"})
    assert status == 200
    # Rated at once: the proxy stores the record before it answers.
    assert post(url, "/v1/feedback", {"id": out["id"], "rating": 4, "comment": "ok"}) == (
        200, {"status": "recorded", "request_id": out["id"]})
    status, chat = post(url, "/v1/chat/completions", {"model": MODEL, "max_tokens": 3, "user": "alice",
                                                      "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200
    streamed = _sse(url, {"model": MODEL, "prompt": "Can I get a refund?", "max_tokens": 4, "stream": True,
                          "stream_options": {"include_usage": True}})
    sid = streamed[0]["id"]
    assert post(url, "/v1/feedback", {"request_id": sid, "rating": "down"}) == (
        200, {"status": "recorded", "request_id": sid})
    code, unknown = post(url, "/v1/feedback", {"id": "cmpl-never-sent", "rating": "up"})
    assert code == 404 and unknown["error"]["code"] == "request_not_found"
    token_client = "token:" + hashlib.sha256(CLIENT_TOKEN.encode()).hexdigest()[:12]
    assert _wait(lambda: len(rows(store, "SELECT id FROM requests WHERE id IN (?, ?, ?)",
                                  (out["id"], chat["id"], sid))) == 3)
    got = rows(store, "SELECT id, client, path, status, prompt, completion, prompt_tokens, completion_tokens "
                      "FROM requests WHERE id IN (?, ?, ?) ORDER BY seq", (out["id"], chat["id"], sid))
    text = "".join(c["choices"][0]["text"] for c in streamed if c.get("choices"))
    usage = [c["usage"] for c in streamed if c.get("usage")][-1]
    assert got == [
        (out["id"], "web-42", "/v1/completions", 200, "Where is my order?", out["choices"][0]["text"],
         out["usage"]["prompt_tokens"], out["usage"]["completion_tokens"]),
        (chat["id"], "user:alice", "/v1/chat/completions", 200, "hi", chat["choices"][0]["message"]["content"],
         chat["usage"]["prompt_tokens"], chat["usage"]["completion_tokens"]),
        (sid, token_client, "/v1/completions", 200, "Can I get a refund?", text, usage["prompt_tokens"],
         usage["completion_tokens"]),
    ]
    assert rows(store, "SELECT request_id, rating, positive, comment, client FROM feedback ORDER BY seq")[-2:] == [
        (out["id"], 4, 1, "ok", token_client), (sid, 0, 0, None, token_client)]
    # `llmops monitor` reads them: the same run_monitor pass over this store.
    from llmops.monitor.runner import run_monitor

    report = run_monitor(served["root"], "watch", {"deployment": "prod", "store": store, "window": 1000}, None)
    assert report.metrics["requests"]["count"] >= 3
    assert report.metrics["feedback"]["count"] >= 2


def test_refusals_and_upstream_errors_are_logged_too(served: dict) -> None:
    url, store = served["proxy"].url, served["store"]
    code, body = post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1}, token=None)
    assert code == 401 and body["error"]["code"] == "invalid_api_key"
    code, body = post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1000},
                      headers={"X-Client-Id": "too-long"})
    assert code == 400 and "maximum context length" in body["error"]["message"]
    assert _wait(lambda: rows(store, "SELECT status FROM requests WHERE client = 'too-long'") == [(400,)])
    assert "maximum context length" in rows(store, "SELECT error FROM requests WHERE client = 'too-long'")[0][0]


def test_upstream_down_is_502_with_a_clear_json_error_and_health_503(tmp_path: Path) -> None:
    import uvicorn

    from llmops.serve.endpoint import free_port
    from llmops.serve.proxy import Proxy, make_app

    records: list[dict[str, Any]] = []
    dead = f"http://127.0.0.1:{free_port()}"
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(Proxy(dead, MODEL, on_request=records.append)),
                                           host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        assert _wait(lambda: server.started)
        code, body = post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1}, token=None)
        assert code == 502 and body["error"]["code"] == "upstream_unavailable"
        assert dead in body["error"]["message"] and "docker logs" in body["error"]["message"]
        code, body = post(url, "/v1/chat/completions", {"model": MODEL, "stream": True,
                                                        "messages": [{"role": "user", "content": "x"}]}, token=None)
        assert code == 502 and body["error"]["code"] == "upstream_unavailable"
        try:
            urllib.request.urlopen(url + "/health", timeout=10)
            raise AssertionError("/health answered 200 with the upstream down")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503 and json.loads(exc.read())["status"] == "unavailable"
        assert [(r["path"], r["status"]) for r in records] == [("/v1/completions", 502),
                                                               ("/v1/chat/completions", 502)]
        assert all(dead in r["error"] for r in records)
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def _sse(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {CLIENT_TOKEN}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        lines = resp.read().decode().split("\n\n")
    assert lines[-2] == "data: [DONE]"
    return [json.loads(x[len("data: "):]) for x in lines if x.startswith("data: {")]


def _wait(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())
