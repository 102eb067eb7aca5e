"""The OpenAI-compatible server over real HTTP on 127.0.0.1, and the evaluator against it.

One tiny random Llama (built locally, never downloaded) is served once per module by an
in-process server with auth on; one test also runs the real `python -m llmops.serve`
background process.
"""

from __future__ import annotations

import json
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
    from llmops.serve.server import ModelService, make_server

    records: list[dict[str, Any]] = []
    lm = load_model(model_dir)
    srv = make_server(ModelService(lm, max_tokens_limit=64), "127.0.0.1", 0, MODEL, TOKEN, records.append)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    host, port = srv.server_address[:2]
    yield {"url": f"http://{host}:{port}", "records": records, "lm": lm}
    srv.shutdown()
    srv.server_close()


def call(server: dict, method: str, path: str, body: Any = None, token: str | None = TOKEN,
         raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server["url"] + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
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
    assert call(server, "GET", "/health", token=None) == (200, {"status": "ok", "model": MODEL})
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
    complete(server, prompt="Where is my order?", max_tokens=3)
    call(server, "POST", "/v1/completions", {"model": MODEL, "prompt": 1})
    # The hook runs after the answer is sent (and a previous test's last record may land late).
    assert wait_for(lambda: any(r["status"] == 400 for r in records))
    ok = next(r for r in records if r["status"] == 200 and r["path"] == "/v1/completions")
    bad = next(r for r in records if r["status"] == 400)
    assert (ok["status"], ok["path"], ok["method"], ok["error"]) == (200, "/v1/completions", "POST", None)
    assert ok["prompt_tokens"] > 0 and ok["completion_tokens"] >= 1 and ok["latency_ms"] > 0
    assert ok["prompt"] == ["Where is my order?"] and len(ok["completion"]) == 1
    assert bad["status"] == 400 and "prompt" in bad["error"]


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
    from llmops.serve.process import ServeError, server_status, start_server, stop_server, wait_healthy

    state = tmp_path / "state"
    handle = start_server(state, "support-prod", model_dir, model_name=MODEL, request_log=state / "requests.jsonl")
    try:
        assert wait_healthy(handle.url, timeout=120, handle=handle) == {"status": "ok", "model": MODEL}
        status = server_status(handle.state_file, probe=True)
        assert (status.running, status.healthy, status.pid, status.port) == (True, True, handle.pid, handle.port)
        with pytest.raises(ServeError, match="already runs"):
            start_server(state, "support-prod", model_dir)
        body = json.dumps({"model": MODEL, "prompt": "Where is my order?", "max_tokens": 2}).encode()
        with urllib.request.urlopen(urllib.request.Request(handle.url + "/v1/completions", data=body), timeout=60) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] >= 1
        # The hook runs after the answer is sent: wait (bounded) for its line.
        log = state / "requests.jsonl"
        assert wait_for(lambda: '"/v1/completions"' in log.read_text())
        logged = [json.loads(line) for line in log.read_text().splitlines()]
        assert [(r["path"], r["status"]) for r in logged] == [("/health", 200)] * (len(logged) - 1) + [
            ("/v1/completions", 200)]
        assert "prompt" not in logged[-1] and "completion" not in logged[-1]  # texts only with --log-text
    finally:
        assert stop_server(handle.state_file) is True
    assert server_status(handle.state_file).running is False
    assert not Path(handle.state_file).exists() and stop_server(handle.state_file) is False


def test_server_that_cannot_start_fails_fast_with_its_log(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from llmops.serve.process import ServeError, start_server, stop_server, wait_healthy

    monkeypatch.delenv("LLMOPS_TEST_UNSET_TOKEN", raising=False)
    handle = start_server(tmp_path, "guarded", model_dir, auth_token_env="LLMOPS_TEST_UNSET_TOKEN")
    with pytest.raises(ServeError, match="LLMOPS_TEST_UNSET_TOKEN") as err:
        wait_healthy(handle.url, timeout=60, handle=handle)
    assert "exited while starting" in err.value.message
    assert stop_server(handle.state_file) is False
