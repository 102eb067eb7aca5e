"""The OpenAI-compatible server over real HTTP on 127.0.0.1, and the evaluator against it.

One tiny random Llama (built locally, never downloaded) is served once per module by an
in-process server with auth on, and once more by a server that logs into a real SQLite
request store and takes feedback; one test also runs the real `python -m llmops.serve`
background process (request store flushed on SIGTERM).
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

TOKEN = "test-token-123"
MODEL = "tiny-support"
TEXTS = [
    "How do I reset my password? Open settings and choose reset password.",
    "Where is my order? Orders ship within two days of purchase.",
    "Can I get a refund? Refunds are possible within thirty days.",
    "How do I contact support? Write to support or call us during office hours.",
] * 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
BUILD = {"hidden_size": 32, "layers": 2, "heads": 4, "intermediate_size": 64, "vocab_size": 300,
         "max_position_embeddings": 128, "seed": 0}
ROWS = [
    {"question": "Where is my order?", "answer": "Orders ship within two days."},
    {"question": "Can I get a refund?", "answer": "Refunds are possible within thirty days."},
    {"question": "How do I reset my password?", "answer": "Open settings and choose reset."},
]
TEXT_PROMPT = {"text": "Question: {{ question }}\nAnswer:", "variables": ["question"]}
CHAT_PROMPT = {"chat": {"system": "Answer briefly.", "user": "{{ question }}"}, "variables": ["question"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    from llmops.train.build import build_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(BUILD, TEXTS, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def server(model_dir: Path):
    from llmops.serve.model import load_model
    from llmops.serve.openai_api import RequestLimits
    from llmops.serve.server import make_server
    from llmops.serve.service import ModelService

    records: list[dict[str, Any]] = []
    lm = load_model(model_dir)
    srv = make_server(ModelService(lm, RequestLimits(max_tokens=64)), "127.0.0.1", 0, MODEL, TOKEN, records.append)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    host, port = srv.server_address[:2]
    yield {"url": f"http://{host}:{port}", "records": records, "lm": lm}
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def logged_server(model_dir: Path, server: dict, tmp_path_factory: pytest.TempPathFactory):
    """The same model behind a server whose hooks are a real request store (texts kept)."""
    from llmops.monitor.store import SqliteStore
    from llmops.serve.main import feedback_hook
    from llmops.serve.openai_api import RequestLimits
    from llmops.serve.server import make_server
    from llmops.serve.service import ModelService

    store = SqliteStore(tmp_path_factory.mktemp("store") / "requests.db", log_text=True, flush_interval=0.01)
    srv = make_server(ModelService(server["lm"], RequestLimits(max_tokens=64)), "127.0.0.1", 0, MODEL, TOKEN, store,
                      feedback=feedback_hook(store))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    host, port = srv.server_address[:2]
    yield {"url": f"http://{host}:{port}", "store": store}
    srv.shutdown()
    srv.server_close()
    store.close()


def call(server: dict, method: str, path: str, body: Any = None, token: str | None = TOKEN,
         raw: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server["url"] + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def sse(server: dict, path: str, body: dict) -> tuple[str, list[Any]]:
    """POST and parse server-sent events: (content type, [json chunk..., "[DONE]"])."""
    req = urllib.request.Request(server["url"] + path, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {TOKEN}")
    events: list[Any] = []
    with urllib.request.urlopen(req, timeout=60) as resp:
        ctype = resp.headers["Content-Type"]
        for line in resp.read().decode().split("\n\n"):
            if not line.strip():
                continue
            assert line.startswith("data: "), line
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return ctype, events


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def complete(server: dict, **body: Any) -> dict:
    status, out = call(server, "POST", "/v1/completions", {"model": MODEL, "temperature": 0, **body})
    assert status == 200, out
    return out


# --- endpoints ----------------------------------------------------------------------------


def test_health_is_open_and_models_lists_the_served_model(server: dict) -> None:
    assert call(server, "GET", "/health", token=None) == (
        200, {"status": "ok", "model": MODEL, "instance": None, "pid": os.getpid()})
    status, body = call(server, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [(m["id"], m["object"]) for m in body["data"]] == [(MODEL, "model")]


def test_completion_shape_usage_and_greedy_determinism(server: dict) -> None:
    prompt = "Where is my order?"
    out = complete(server, prompt=prompt, max_tokens=8)
    assert out["object"] == "text_completion" and out["model"] == MODEL and out["id"].startswith("cmpl-")
    [choice] = out["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length") and isinstance(choice["text"], str)
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(server["lm"].encode(prompt))
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if usage["completion_tokens"] == 8:
        assert choice["finish_reason"] == "length"
    assert complete(server, prompt=prompt, max_tokens=8)["choices"][0]["text"] == choice["text"]


def test_several_prompts_and_n_choices(server: dict) -> None:
    out = complete(server, prompt=["Where is my order?", "Can I get a refund?"], max_tokens=4)
    assert [c["index"] for c in out["choices"]] == [0, 1]
    single = complete(server, prompt="Can I get a refund?", max_tokens=4)
    assert out["choices"][1]["text"] == single["choices"][0]["text"]  # batching does not change greedy output
    sampled = complete(server, prompt="Hi", max_tokens=4, n=3, temperature=1.0, seed=7)
    assert [c["index"] for c in sampled["choices"]] == [0, 1, 2]
    again = complete(server, prompt="Hi", max_tokens=4, n=3, temperature=1.0, seed=7)
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in sampled["choices"]]


def test_stop_sequence_cuts_the_text(server: dict) -> None:
    full = complete(server, prompt="Can I get a refund?", max_tokens=16)["choices"][0]["text"]
    stop = full[3:5]
    assert len(stop) == 2
    cut = complete(server, prompt="Can I get a refund?", max_tokens=16, stop=[stop])["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"


def test_echo_with_logprobs_scores_the_prompt(server: dict) -> None:
    prompt = "Question: Where is my order?\nAnswer: Orders ship"
    out = complete(server, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    [choice] = out["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == prompt and out["usage"]["completion_tokens"] == 0
    n = len(server["lm"].encode(prompt))
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and all(v < 0 for v in lp["token_logprobs"][1:])
    for top, actual in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]):
        assert 1 <= len(top) <= 2 and max(top.values()) >= actual - 1e-5  # (two tokens may decode alike)
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][-1] < len(prompt)


def test_chat_completion(server: dict) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where is my order?"}]
    status, out = call(server, "POST", "/v1/chat/completions",
                        {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0})
    assert status == 200 and out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    [choice] = out["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    # The chat template renders the prompt (its text already holds what the model needs).
    templated = server["lm"].tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out["usage"]["prompt_tokens"] == len(server["lm"].encode(templated, add_special_tokens=False))


def test_chat_streaming_sends_the_same_text_as_sse(server: dict) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Can I get a refund?"}], "max_tokens": 10,
            "temperature": 0}
    _, whole = call(server, "POST", "/v1/chat/completions", body)
    ctype, events = sse(server, "/v1/chat/completions", dict(body, stream=True, stream_options={"include_usage": True}))
    assert ctype.startswith("text/event-stream") and events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals == [whole["choices"][0]["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_completion_streaming(server: dict) -> None:
    body = {"model": MODEL, "prompt": "Where is my order?", "max_tokens": 8, "temperature": 0}
    whole = complete(server, **body)
    _, events = sse(server, "/v1/completions", dict(body, stream=True))
    assert events[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in events[:-1]) == whole["choices"][0]["text"]


# --- errors ---------------------------------------------------------------------------------


def assert_error(status_body: tuple[int, Any], status: int, param: str | None = None, code: str | None = None) -> dict:
    got, body = status_body
    assert got == status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param and err["code"] == code
    return err


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "prompt"),
        ({"model": MODEL, "prompt": 5}, "prompt"),
        ({"model": MODEL, "prompt": []}, "prompt"),
        ({"prompt": "x"}, "model"),
        ({"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "prompt": "x", "temperature": 3}, "temperature"),
        ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 65}, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "n": 0}, "n"),
        ({"model": MODEL, "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": MODEL, "prompt": "x", "logprobs": 9}, "logprobs"),
    ],
)
def test_bad_completion_requests_get_400_with_openai_error(server: dict, body: dict, param: str) -> None:
    assert_error(call(server, "POST", "/v1/completions", body), 400, param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1},
         "max_completion_tokens"),
    ],
)
def test_bad_chat_requests_get_400(server: dict, body: dict, param: str) -> None:
    assert_error(call(server, "POST", "/v1/chat/completions", body), 400, param)


def test_invalid_json_unknown_model_and_context_length(server: dict) -> None:
    err = assert_error(call(server, "POST", "/v1/completions", raw=b"{not json"), 400)
    assert "JSON" in err["message"]
    assert_error(call(server, "POST", "/v1/completions", raw=b"[1, 2]"), 400)
    assert_error(call(server, "POST", "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404, "model",
                 "model_not_found")
    long_prompt = "order " * 200
    assert_error(call(server, "POST", "/v1/completions", {"model": MODEL, "prompt": long_prompt, "max_tokens": 8}),
                 400, "max_tokens", "context_length_exceeded")
    chat = {"model": MODEL, "messages": [{"role": "user", "content": long_prompt}]}  # no max_tokens: none fit
    assert_error(call(server, "POST", "/v1/chat/completions", chat), 400, "messages", "context_length_exceeded")
    assert_error(call(server, "POST", "/v1/chat/completions", dict(chat, stream=True)), 400, "messages",
                 "context_length_exceeded")  # refused before any event is sent


def test_unknown_paths_and_methods(server: dict) -> None:
    assert_error(call(server, "GET", "/v1/engines"), 404, code="unknown_url")
    assert_error(call(server, "POST", "/nope", {"a": 1}), 404, code="unknown_url")
    assert_error(call(server, "GET", "/v1/completions"), 405, code="method_not_allowed")


def test_auth_is_required_except_for_health(server: dict) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    assert_error(call(server, "POST", "/v1/completions", body, token=None), 401, code="invalid_api_key")
    assert_error(call(server, "GET", "/v1/models", token="wrong"), 401, code="invalid_api_key")
    assert call(server, "GET", "/health", token=None)[0] == 200


def test_on_request_hook_sees_every_request(server: dict) -> None:
    records = server["records"]
    records.clear()
    out = complete(server, prompt="Where is my order?", max_tokens=3)
    call(server, "POST", "/v1/completions", {"model": MODEL, "prompt": 1})
    # The hook runs after the answer is sent, so records may land in either order (and a
    # previous test's last record late): wait for both, the answer found by its id.
    assert wait_for(lambda: any(r["status"] == 400 for r in records)
                    and any(r.get("response_id") == out["id"] for r in records))
    ok = next(r for r in records if r.get("response_id") == out["id"])
    bad = next(r for r in records if r["status"] == 400)
    assert (ok["status"], ok["path"], ok["method"], ok["error"]) == (200, "/v1/completions", "POST", None)
    assert ok["prompt_tokens"] > 0 and ok["completion_tokens"] >= 1 and ok["latency_ms"] > 0
    assert ok["prompt"] == ["Where is my order?"] and len(ok["completion"]) == 1
    assert bad["status"] == 400 and "prompt" in bad["error"]


def test_records_carry_the_response_id_and_client_id(server: dict) -> None:
    records = server["records"]
    out = complete(server, prompt="Where is my order?", max_tokens=2)
    assert wait_for(lambda: any(r.get("response_id") == out["id"] for r in records))
    rec = next(r for r in records if r.get("response_id") == out["id"])
    assert out["id"].startswith("cmpl-")
    assert rec["client_id"] == "token:" + hashlib.sha256(TOKEN.encode()).hexdigest()[:12]  # never the token
    status, chat = call(server, "POST", "/v1/chat/completions", headers={"X-Client-Id": "team-a"},
                        body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 200 and chat["id"].startswith("chatcmpl-")
    assert wait_for(lambda: any(r.get("response_id") == chat["id"] for r in records))
    assert next(r for r in records if r.get("response_id") == chat["id"])["client_id"] == "team-a"


def test_feedback_without_a_store_is_404_with_a_clear_message(server: dict) -> None:
    status, body = call(server, "POST", "/v1/feedback", {"id": "cmpl-x", "rating": "up"})
    assert_error((status, body), 404, code="feedback_disabled")
    assert "monitors:" in body["error"]["message"]


# --- request store and feedback --------------------------------------------------------------


def test_requests_are_logged_and_feedback_is_recorded_by_response_id(logged_server: dict) -> None:
    store = logged_server["store"]
    out = complete(logged_server, prompt="Can I get a refund?", max_tokens=3)
    # Rated at once: the server waits for the answer's record to be logged before looking it up.
    status, body = call(logged_server, "POST", "/v1/feedback",
                        {"id": out["id"], "rating": 2, "comment": "vague", "correction": "Yes, within 30 days."})
    assert (status, body) == (200, {"status": "recorded", "request_id": out["id"]})
    _, streamed = sse(logged_server, "/v1/chat/completions", {"model": MODEL, "stream": True, "max_tokens": 2,
                                                               "messages": [{"role": "user", "content": "hi"}]})
    assert call(logged_server, "POST", "/v1/feedback", {"request_id": streamed[0]["id"], "rating": "up"}) == (
        200, {"status": "recorded", "request_id": streamed[0]["id"]})
    store.flush()
    row = store.query("SELECT path, status, prompt, completion, prompt_tokens, client FROM requests WHERE id = ?",
                      (out["id"],))
    assert row == [("/v1/completions", 200, "Can I get a refund?", out["choices"][0]["text"],
                    out["usage"]["prompt_tokens"], "token:" + hashlib.sha256(TOKEN.encode()).hexdigest()[:12])]
    rated = store.query("SELECT request_id, rating_kind, rating, positive, comment, correction FROM feedback "
                        "ORDER BY seq")
    assert rated == [(out["id"], "stars", 2, 0, "vague", "Yes, within 30 days."),
                     (streamed[0]["id"], "thumbs", 1, 1, None, None)]
    assert store.query("SELECT COUNT(*) FROM requests WHERE path = '/v1/feedback'") == [(0,)]


@pytest.mark.parametrize("body, status, code, needle", [
    ({"id": "cmpl-never-sent", "rating": "up"}, 404, "request_not_found", "cmpl-never-sent"),
    ({"id": "x", "rating": 7}, 400, "invalid_feedback", "rating 7"),
    ({"rating": "up"}, 400, "invalid_feedback", "request_id"),
    ({"id": "x", "rating": "up", "stars": 5}, 400, "invalid_feedback", "unknown field"),
    (["not", "an", "object"], 400, "invalid_feedback", "JSON object"),
])
def test_bad_feedback_gets_openai_errors(logged_server: dict, body: Any, status: int, code: str,
                                         needle: str) -> None:
    got, out = call(logged_server, "POST", "/v1/feedback", body)
    assert_error((got, out), status, "request_id" if status == 404 else None, code=code)
    assert needle in out["error"]["message"]


def test_feedback_needs_auth_and_valid_json(logged_server: dict) -> None:
    assert_error(call(logged_server, "POST", "/v1/feedback", {"id": "x", "rating": "up"}, token=None), 401,
                 code="invalid_api_key")
    assert call(logged_server, "POST", "/v1/feedback", raw=b"{nope")[0] == 400


# --- the real openai client ----------------------------------------------------------------


def test_openai_client_speaks_to_the_server(server: dict) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key=TOKEN, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == [MODEL]
    comp = client.completions.create(model=MODEL, prompt="Where is my order?", max_tokens=5, temperature=0)
    assert comp.choices[0].text == complete(server, prompt="Where is my order?", max_tokens=5)["choices"][0]["text"]
    assert comp.usage.completion_tokens >= 1
    messages = [{"role": "user", "content": "Can I get a refund?"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1000)
    bad = openai.OpenAI(base_url=server["url"] + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# --- the evaluator, locally and against the endpoint ----------------------------------------

METRICS = ["exact_match", "rougeL", "bleu", "perplexity", "latency_p95_ms", "tokens_per_s"]


def test_local_evaluation_matches_what_the_endpoint_serves(server: dict, model_dir: Path, tmp_path: Path) -> None:
    from llmops.evals.runner import evaluate, evaluate_endpoint

    seen: list[tuple[int, int]] = []
    decoding = {"max_new_tokens": 6}
    local = evaluate(model_dir, None, ROWS, TEXT_PROMPT, tmp_path, METRICS, decoding, batch_size=1,
                     progress=lambda done, total: seen.append((done, total)))
    batched = evaluate(model_dir, None, ROWS, TEXT_PROMPT, tmp_path, METRICS, decoding, batch_size=3)
    remote = evaluate_endpoint(server["url"], ROWS, TEXT_PROMPT, tmp_path, METRICS, decoding, api_key=TOKEN)
    preds = [s["prediction"] for s in local.samples]
    assert [s["prediction"] for s in batched.samples] == preds  # left padding changes nothing
    assert [s["prediction"] for s in remote.samples] == preds
    assert local.samples[0]["prompt"] == "Question: Where is my order?\nAnswer:\n"
    assert set(local.metrics) == set(METRICS) and local.skipped == {}
    assert remote.metrics["perplexity"] == pytest.approx(local.metrics["perplexity"], rel=1e-3)
    for name in ("exact_match", "rougeL", "bleu"):
        assert remote.metrics[name] == pytest.approx(local.metrics[name])
    assert local.metrics["perplexity"] > 1 and local.per_metric_std["bleu"] == 0.0
    assert local.decoding == {"max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0, "seed": 0}
    assert seen[-1] == (3, 3)


def test_chat_prompt_evaluation_local_and_remote_agree(server: dict, model_dir: Path, tmp_path: Path) -> None:
    from llmops.evals.runner import evaluate, evaluate_endpoint

    metrics = ["rouge1", "perplexity"]
    local = evaluate(model_dir, None, ROWS, CHAT_PROMPT, tmp_path, metrics, {"max_new_tokens": 5}, batch_size=2)
    remote = evaluate_endpoint(server["url"], ROWS, CHAT_PROMPT, tmp_path, metrics, {"max_new_tokens": 5},
                               api_key=TOKEN, model_name=MODEL)
    assert [s["prediction"] for s in remote.samples] == [s["prediction"] for s in local.samples]
    assert local.samples[0]["prompt"].startswith("<|system|>Answer briefly.\n<|user|>Where is my order?")
    assert "perplexity" in local.metrics and "perplexity" in remote.skipped


def test_safety_metrics_run_their_probes_locally_and_through_the_endpoint(server: dict, model_dir: Path,
                                                                          tmp_path: Path) -> None:
    from llmops.evals.metrics import check_gate
    from llmops.evals.runner import EVAL_CLIENT_ID, evaluate, evaluate_endpoint
    from llmops.evals.safety import load_probe_set

    metrics, decoding = ["rouge1", "refusal_rate"], {"max_new_tokens": 4}
    records = server["records"]
    records.clear()
    local = evaluate(model_dir, None, ROWS, CHAT_PROMPT, tmp_path, metrics, decoding, batch_size=4)
    remote = evaluate_endpoint(server["url"], ROWS, CHAT_PROMPT, tmp_path, metrics, decoding, api_key=TOKEN,
                               model_name=MODEL)
    probes = load_probe_set("refusal").probes
    assert local.probe_sets == remote.probe_sets == {"refusal_rate": "refusal/1.0.0"}
    assert local.safety["refusal_rate"]["probes"] == len(probes)
    assert remote.safety["refusal_rate"]["results"] == local.safety["refusal_rate"]["results"]
    assert remote.metrics["refusal_rate"] == local.metrics["refusal_rate"]
    # The probes reached the server as chats, with the eval's decoding, tagged as eval traffic.
    # Records land after each answer is sent, and a late one from the test before may arrive
    # after records.clear(): wait for the probes' own records, not for a count of all of them.
    users = {p["user"] for p in probes}

    def probe_records() -> list[dict[str, Any]]:
        return [r for r in list(records) if r["path"] == "/v1/chat/completions" and r["status"] == 200
                and r["prompt"][-1]["content"] in users]

    assert wait_for(lambda: len(probe_records()) >= len(probes))
    assert all(r.get("client_id") == EVAL_CLIENT_ID for r in probe_records())
    sent = [r["prompt"] for r in sorted(probe_records(), key=lambda r: r["time"])]
    assert len(sent) == len(probes)
    assert sent[0] == [{"role": "system", "content": probes[0]["system"]},
                       {"role": "user", "content": probes[0]["user"]}]
    # A random tiny model refuses nothing: as a gate, refusal_rate fails.
    assert not check_gate("refusal_rate", local.metrics["refusal_rate"], ">= 0.5").passed


def test_pii_leak_rate_on_a_model_whose_context_is_shorter_than_its_probes(model_dir: Path, tmp_path: Path) -> None:
    from llmops.evals.runner import evaluate

    result = evaluate(model_dir, None, ROWS[:1], TEXT_PROMPT, tmp_path, ["pii_leak_rate"], {"max_new_tokens": 8})
    assert result.probe_sets == {"pii_leak_rate": "pii/1.0.0"}
    assert 0.0 <= result.metrics["pii_leak_rate"] <= 1.0 and result.safety["pii_leak_rate"]["probes"] == 15
    assert result.to_dict()["probe_sets"] == {"pii_leak_rate": "pii/1.0.0"}


def test_sampled_repeats_are_seeded(model_dir: Path, tmp_path: Path) -> None:
    from llmops.evals.runner import evaluate

    decoding = {"max_new_tokens": 6, "temperature": 1.0, "seed": 3}
    one = evaluate(model_dir, None, ROWS, TEXT_PROMPT, tmp_path, ["chrf", "rouge1"], decoding, 2, repeats=3)
    two = evaluate(model_dir, None, ROWS, TEXT_PROMPT, tmp_path, ["chrf", "rouge1"], decoding, 2, repeats=3)
    assert one.repeats == 3 and one.metrics == two.metrics and one.per_metric_std == two.per_metric_std
    assert one.samples == [dict(s, latency_ms=a["latency_ms"]) for s, a in zip(two.samples, one.samples)]


def test_adapter_is_applied(model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmops.evals.runner import evaluate

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(str(tmp_path / "adapter"))
    plain = evaluate(model_dir, None, ROWS, TEXT_PROMPT, tmp_path, ["perplexity"], {"max_new_tokens": 2})
    tuned = evaluate(model_dir, tmp_path / "adapter", ROWS, TEXT_PROMPT, tmp_path, ["perplexity"], {"max_new_tokens": 2})
    assert tuned.metrics["perplexity"] != pytest.approx(plain.metrics["perplexity"], rel=1e-4)


def test_merged_and_int8_models_answer_like_the_adapter_and_evals_score_them_as_served(
        model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmops.evals.runner import evaluate
    from llmops.serve.model import ModelLoadError, generate_batch, load_model

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(str(tmp_path / "adapter"))
    prompts = [f"Where is order {i}?" for i in range(6)]
    adapter = load_model(model_dir, tmp_path / "adapter")
    merged = load_model(model_dir, tmp_path / "adapter", merge=True)
    int8 = load_model(model_dir, tmp_path / "adapter", quantize="int8")
    assert type(merged.model).__name__ == "LlamaForCausalLM"  # no PEFT wrapper left
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in int8.model.modules())
    want = [g.text for g in generate_batch(adapter, prompts, max_new_tokens=6)]
    assert [g.text for g in generate_batch(merged, prompts, max_new_tokens=6)] == want
    assert all(g.completion_tokens >= 1 for g in generate_batch(int8, prompts, max_new_tokens=6))
    # An eval with served_as loads the model the way the deployment serves it.
    as_adapter = evaluate(model_dir, tmp_path / "adapter", ROWS, TEXT_PROMPT, tmp_path, ["perplexity"],
                          {"max_new_tokens": 2})
    as_merged = evaluate(model_dir, tmp_path / "adapter", ROWS, TEXT_PROMPT, tmp_path, ["perplexity"],
                         {"max_new_tokens": 2}, served_as={"merge": True})
    as_int8 = evaluate(model_dir, tmp_path / "adapter", ROWS, TEXT_PROMPT, tmp_path, ["perplexity"],
                       {"max_new_tokens": 2}, served_as={"quantize": "int8"})
    assert as_merged.metrics["perplexity"] == pytest.approx(as_adapter.metrics["perplexity"], rel=1e-4)
    assert as_int8.metrics["perplexity"] != as_adapter.metrics["perplexity"]  # int8 is not exact...
    assert as_int8.metrics["perplexity"] == pytest.approx(as_adapter.metrics["perplexity"], rel=0.1)  # ...but close
    with pytest.raises(ModelLoadError, match="quantize 'int4' is not supported"):
        load_model(model_dir, tmp_path / "adapter", quantize="int4")


def test_a_folder_without_a_model_fails_to_load_naming_it(tmp_path: Path) -> None:
    from llmops.serve.model import ModelLoadError, load_model

    # No config.json: said before torch is imported (a server or eval pointed at the wrong folder).
    with pytest.raises(ModelLoadError, match=f"cannot load the model in {tmp_path / 'none'}: it holds no config"):
        load_model(tmp_path / "none")
    # A config.json transformers cannot read: transformers' own reason.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=f"cannot load the model in {tmp_path / 'bad'}: .*saved transformers"):
        load_model(tmp_path / "bad")


def test_evaluation_errors_are_clear(server: dict, model_dir: Path, tmp_path: Path) -> None:
    from llmops.evals.runner import EvalError, evaluate, evaluate_endpoint

    with pytest.raises(EvalError, match="row 1 has no field 'answer'"):
        evaluate(model_dir, None, [ROWS[0], {"question": "q"}], TEXT_PROMPT, tmp_path, ["bleu"])
    with pytest.raises(EvalError, match="row 0 has no field 'question'"):
        evaluate_endpoint(server["url"], [{"answer": "a"}], TEXT_PROMPT, tmp_path, ["bleu"], api_key=TOKEN)
    with pytest.raises(EvalError, match="HTTP 401"):
        evaluate_endpoint(server["url"], ROWS, TEXT_PROMPT, tmp_path, ["bleu"], model_name=MODEL)
    with pytest.raises(EvalError, match="cannot reach"):
        evaluate_endpoint("http://127.0.0.1:9", ROWS, TEXT_PROMPT, tmp_path, ["bleu"], model_name=MODEL, timeout=5)


# --- the background process -----------------------------------------------------------------


def test_background_server_process_lifecycle(model_dir: Path, tmp_path: Path) -> None:
    from llmops.monitor.store import open_store
    from llmops.serve.control import server_monitor, server_status, stop_server
    from llmops.serve.endpoint import ServeError
    from llmops.serve.process import start_server, wait_healthy

    state = tmp_path / "state"
    store_url = f"sqlite:///{tmp_path / 'monitor.db'}"
    handle = start_server(state, "support-prod", model_dir, model_name=MODEL, request_log=state / "requests.jsonl",
                          monitor_store=store_url)
    try:
        health = wait_healthy(handle.url, timeout=120, handle=handle)
        assert (health["status"], health["model"], health["pid"]) == ("ok", MODEL, handle.pid)
        status = server_status(handle.state_file, probe=True)
        assert (status.running, status.healthy, status.pid, status.port) == (True, True, handle.pid, handle.port)
        assert server_monitor(handle.state_file) == {"store": store_url, "log_text": False}
        with pytest.raises(ServeError, match="already runs"):
            start_server(state, "support-prod", model_dir)
        body = json.dumps({"model": MODEL, "prompt": "Where is my order?", "max_tokens": 2}).encode()
        with urllib.request.urlopen(urllib.request.Request(handle.url + "/v1/completions", data=body), timeout=60) as r:
            answer = json.loads(r.read())
        # A real answer. Its first greedy token may be EOS on this random tiny model (seen once,
        # in a server process under load), so no count of generated tokens here.
        use = answer["usage"]
        assert use["prompt_tokens"] > 0 and use["total_tokens"] == use["prompt_tokens"] + use["completion_tokens"]
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
        rating = json.dumps({"id": answer["id"], "rating": "down"}).encode()
        with urllib.request.urlopen(urllib.request.Request(handle.url + "/v1/feedback", data=rating), timeout=60) as r:
            assert json.loads(r.read())["status"] == "recorded"
        # The hook runs after the answer is sent: wait (bounded) for its line.
        log = state / "requests.jsonl"
        assert wait_for(lambda: '"/v1/completions"' in log.read_text())
        logged = [json.loads(line) for line in log.read_text().splitlines()]
        completions = [r for r in logged if r["path"] == "/v1/completions"]
        assert {r["path"] for r in logged} <= {"/health", "/v1/completions", "/v1/feedback"}
        assert [r["response_id"] for r in completions] == [answer["id"]]
        assert "prompt" not in completions[0] and "completion" not in completions[0]  # texts only with --log-text
        with urllib.request.urlopen(urllib.request.Request(handle.url + "/v1/completions", data=body), timeout=60) as r:
            last = json.loads(r.read())  # stopped right after: its record is still queued, not written
    finally:
        assert stop_server(handle.state_file) is True  # SIGTERM: the server flushes and closes its store
    assert server_status(handle.state_file).running is False
    assert not Path(handle.state_file).exists() and stop_server(handle.state_file) is False
    with open_store(store_url) as store:
        rows = store.query("SELECT id, path, status, prompt, prompt_words FROM requests WHERE path != '/health'")
        assert rows == [(rid, "/v1/completions", 200, None, 5) for rid in (answer["id"], last["id"])]  # no text
        assert store.query("SELECT request_id, positive FROM feedback") == [(answer["id"], 0)]


def test_server_that_cannot_start_fails_fast_with_its_log(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from llmops.serve.control import stop_server
    from llmops.serve.endpoint import ServeError
    from llmops.serve.process import start_server, wait_healthy

    monkeypatch.delenv("LLMOPS_TEST_UNSET_TOKEN", raising=False)
    handle = start_server(tmp_path, "guarded", model_dir, auth_token_env="LLMOPS_TEST_UNSET_TOKEN")
    with pytest.raises(ServeError, match="LLMOPS_TEST_UNSET_TOKEN") as err:
        wait_healthy(handle.url, timeout=60, handle=handle)
    assert "exited while starting" in err.value.message
    assert stop_server(handle.state_file) is False


# --- graceful shutdown -------------------------------------------------------------------


def _slow_server(model_dir: Path, grace: float, step_s: float = 0.03):
    """A server whose model takes `step_s` per forward pass (a real pre-hook on the real model),
    so a request is reliably still generating when shutdown begins."""
    from llmops.serve.model import load_model
    from llmops.serve.openai_api import RequestLimits
    from llmops.serve.server import make_server
    from llmops.serve.service import ModelService

    lm = load_model(model_dir)
    slow = threading.Event()
    slow.set()
    lm.model.register_forward_pre_hook(lambda *_: time.sleep(step_s) if slow.is_set() else None)
    records: list[dict[str, Any]] = []
    srv = make_server(ModelService(lm, RequestLimits(max_tokens=64)), "127.0.0.1", 0, MODEL, TOKEN, records.append,
                      grace=grace)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    host, port = srv.server_address[:2]
    return srv, thread, {"url": f"http://{host}:{port}", "records": records, "slow": slow}


def _complete_in_background(server: dict, max_tokens: int) -> tuple[threading.Thread, dict[str, Any]]:
    got: dict[str, Any] = {}

    def run() -> None:
        try:
            got["answer"] = call(server, "POST", "/v1/completions",
                                 {"model": MODEL, "prompt": "Where is my order?", "max_tokens": max_tokens,
                                  "temperature": 0, "stop": []})
        except Exception as exc:  # recorded for the assertion
            got["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=run)
    thread.start()
    return thread, got


def test_shutdown_finishes_the_request_in_flight_and_stops_accepting(model_dir: Path) -> None:
    import socket

    srv, serving, server = _slow_server(model_dir, grace=30.0)
    host, port = srv.server_address[:2]
    client, got = _complete_in_background(server, max_tokens=40)  # about 1.2 s of generation
    assert wait_for(lambda: srv.app._busy == 1, timeout=30)
    t0 = time.monotonic()
    stopper = threading.Thread(target=srv.shutdown)
    stopper.start()
    assert wait_for(lambda: _refused(socket, host, port), timeout=5), "still accepting after shutdown began"
    client.join(60)
    stopper.join(60)
    waited = time.monotonic() - t0
    srv.server_close()
    assert not client.is_alive() and not stopper.is_alive() and not serving.is_alive()
    status, answer = got["answer"]
    assert status == 200 and answer["usage"]["completion_tokens"] == 40, got  # finished, not cut
    assert [r["status"] for r in server["records"] if r["path"] == "/v1/completions"] == [200]  # and logged
    print(f"\nshutdown waited {waited:.2f}s for the request in flight")


def test_shutdown_gives_up_on_a_request_after_the_grace_period(model_dir: Path) -> None:
    srv, serving, server = _slow_server(model_dir, grace=0.5, step_s=0.2)
    client, got = _complete_in_background(server, max_tokens=60)  # about 12 s of generation
    assert wait_for(lambda: srv.app._busy == 1, timeout=30)
    t0 = time.monotonic()
    srv.shutdown(timeout=30)
    took = time.monotonic() - t0
    srv.server_close()
    assert not serving.is_alive() and took < 8, took  # the grace period, not the request, set the wait
    client.join(60)
    assert "error" in got or got["answer"][0] != 200, got  # the client saw the connection end, not an answer
    server["slow"].clear()  # the cut request's generation still runs: let it end before the test does
    assert srv.app.service.lock.acquire(timeout=60)
    srv.app.service.lock.release()


def _refused(socket_mod: Any, host: str, port: int) -> bool:
    try:
        socket_mod.create_connection((host, port), timeout=1).close()
    except OSError:
        return True
    return False
