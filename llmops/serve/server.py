"""The OpenAI-compatible model server: one model loaded once, generation under a lock.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
server-sent events), GET /v1/models, GET /health, and POST /v1/feedback when a feedback
hook is configured. Every refused request gets an OpenAI error body and a 4xx status;
unexpected failures get a 500 error body, never a dropped connection.

`on_request(record)` is called once per request (after the answer is sent) with a flat
dict of facts: `id`, `time`, `method`, `path`, `client` (remote address), `client_id` (see
`llmops.monitor.records.client_id`), `status`, `error`, `latency_ms`, and for generations
`response_id` (the `cmpl-`/`chatcmpl-` id the client saw), `prompt`, `completion`,
`prompt_tokens`, `completion_tokens`. It is the hook request logging plugs into
(a `llmops.monitor` request store is one). `feedback(body) -> request id` records a
`POST /v1/feedback` body; it raises `llmops.monitor.FeedbackError`s, answered with their
status (400 malformed, 404 unknown id).

The command line (`python -m llmops.serve`) lives in `llmops.serve.main`.
"""

from __future__ import annotations

import hmac
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

from llmops.monitor.records import client_id
from llmops.serve import openai_api as api
from llmops.serve.openai_api import GenerationRequest, RequestError, RequestLimits

MAX_BODY_BYTES = 4 * 1024 * 1024
# Set by whoever starts the server (llmops.serve.process/container): a random token that
# /health repeats, so the starter can tell its own server from anything else on the port.
INSTANCE_ENV = "LLMOPS_SERVE_INSTANCE"
FEEDBACK_WAIT_S = 10.0  # how long feedback waits for its response's record to be logged
OnRequest = Callable[[dict[str, Any]], None]
OnFeedback = Callable[[Any], str]


@dataclass
class Outcome:
    """What one generation request produced, for the response and the request record."""

    texts: list[tuple[str, str]]  # (text, finish_reason) per choice
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict[str, Any] | None] = field(default_factory=list)


class ModelService:
    """The loaded model behind the HTTP layer; every model/tokenizer call holds `lock`."""

    def __init__(self, lm: Any, limits: RequestLimits | None = None, default_chat_max_tokens: int = 256) -> None:
        self.lm = lm
        self.lock = threading.Lock()
        self.limits = limits or RequestLimits()
        self.default_chat_max_tokens = default_chat_max_tokens

    def _prompt(self, req: GenerationRequest, text: str | None = None) -> tuple[str, bool]:
        """(prompt text, add_special_tokens) for a request; chats use the chat template."""
        from llmops.prompts import has_chat_template, messages_to_text

        if req.kind == "chat":
            return messages_to_text(req.messages, self.lm.tokenizer), not has_chat_template(self.lm.tokenizer)
        return text or "", True

    def _budget(self, req: GenerationRequest, prompt_tokens: int) -> int:
        context = self.lm.max_positions
        wanted = req.max_tokens
        if wanted is None:  # as much as fits, up to the default, but at least one token
            wanted = max(min(self.default_chat_max_tokens, context - prompt_tokens), 1)
        if prompt_tokens + wanted > context:
            param = "messages" if req.kind == "chat" else "max_tokens"
            raise RequestError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the prompt; {wanted} for the completion). "
                "Please reduce the prompt or the completion length.",
                param, "context_length_exceeded",
            )
        return wanted

    def _check_request_tokens(self, req: GenerationRequest, prompt_tokens: int, choices: int, wanted: int) -> None:
        """The parser bounded choices x max_tokens; with the prompts tokenized, bound the whole request."""
        total, limit = prompt_tokens + choices * wanted, self.limits.max_request_tokens
        if total <= limit:
            return
        param = "max_tokens" if choices * wanted > limit else ("messages" if req.kind == "chat" else "prompt")
        raise RequestError(
            400,
            f"This request asks for {total} tokens ({prompt_tokens} in the prompts; {choices} completions x {wanted} "
            f"tokens); this server allows {limit} tokens per request. Send shorter or fewer prompts, a smaller n or "
            "a smaller max_tokens.",
            param, "request_tokens_exceeded",
        )

    def _seed(self, req: GenerationRequest) -> None:
        if req.seed is not None:
            import torch

            torch.manual_seed(req.seed)

    def generate(self, req: GenerationRequest) -> Outcome:
        """Answer a non-streaming request (all prompts x n choices in one batch)."""
        from llmops.serve.model import generate_batch

        with self.lock:
            items = [self._prompt(req, p) for p in (req.prompts or [""])]
            budgets, prompt_ids = [], []
            for text, special in items:
                ids = self.lm.encode(text, special)
                prompt_ids.append(ids)
                budgets.append(self._budget(req, len(ids)))
            wanted = max(budgets)
            self._check_request_tokens(req, sum(len(ids) for ids in prompt_ids), len(items) * req.n, wanted)
            self._seed(req)
            outs = []
            if wanted > 0:
                batch = [text for text, _ in items for _ in range(req.n)]
                outs = generate_batch(self.lm, batch, max_new_tokens=wanted, temperature=req.temperature,
                                      top_p=req.top_p, add_special_tokens=items[0][1], stop=req.stop)
            texts, logprobs, completion = [], [], 0
            for k in range(len(items) * req.n):
                p = k // req.n
                if outs:
                    g = outs[k]
                    text, reason, kept = g.text, g.finish_reason, g.completion_tokens
                else:
                    text, reason, kept = "", "length", 0
                completion += kept
                if req.echo:
                    text = items[p][0] + text
                texts.append((text, reason))
                if req.logprobs is not None:
                    logprobs.append(self._logprobs(req, items[p][0], prompt_ids[p], outs[k].text if outs else ""))
            prompt_total = sum(len(ids) for ids in prompt_ids)  # counted once, whatever n is
        return Outcome(texts, prompt_total, completion, logprobs)

    def _logprobs(self, req: GenerationRequest, prompt: str, prompt_ids: list[int], completion: str) -> dict[str, Any]:
        """OpenAI `logprobs` of the returned text; `text_offset` counts from its start."""
        from llmops.serve.model import token_logprobs

        tok = self.lm.tokenizer
        comp_ids = self.lm.encode(completion, add_special_tokens=False)
        values, tops = token_logprobs(self.lm, prompt_ids + comp_ids, req.logprobs or 0)
        pieces = [tok.decode([i]) for i in prompt_ids + comp_ids]
        offsets = []
        if req.echo:
            spans = tok(prompt, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
            offsets = [int(s[0]) for s in spans][: len(prompt_ids)]
            offsets += [0] * (len(prompt_ids) - len(offsets))
        pos = len(prompt) if req.echo else 0
        for piece in pieces[len(prompt_ids):]:
            offsets.append(pos)
            pos += len(piece)
        first = 0 if req.echo else len(prompt_ids)
        return {
            "tokens": pieces[first:],
            "token_logprobs": values[first:],
            "top_logprobs": tops[first:] if req.logprobs else None,
            "text_offset": offsets[first:] if req.echo else offsets,
        }

    def stream(self, req: GenerationRequest, outcome: Outcome) -> Iterator[str]:
        """Text deltas of a streaming request; fills `outcome` when done. Holds the lock throughout."""
        from llmops.serve.model import TokenStream

        with self.lock:
            text, special = self._prompt(req, req.prompts[0] if req.prompts else None)
            prompt_tokens = len(self.lm.encode(text, special))
            budget = self._budget(req, prompt_tokens)
            self._check_request_tokens(req, prompt_tokens, 1, budget)
            self._seed(req)
            stream = TokenStream(self.lm, text, max_new_tokens=budget, temperature=req.temperature,
                                 top_p=req.top_p, add_special_tokens=special, stop=req.stop)
            yield from stream
            assert stream.result is not None
            outcome.texts = [(stream.result.text, stream.result.finish_reason)]
            outcome.prompt_tokens = prompt_tokens
            outcome.completion_tokens = stream.result.completion_tokens


@dataclass
class App:
    """Everything a request handler needs; shared by all handler threads."""

    service: ModelService
    model_name: str
    auth_token: str | None = None
    on_request: OnRequest | None = None
    feedback: OnFeedback | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    instance: str | None = field(default_factory=lambda: os.environ.get(INSTANCE_ENV) or None)
    log: Callable[[str], None] = lambda line: None
    # Response ids sent but whose record `on_request` has not had yet: feedback on one of
    # them waits for it (a client may rate an answer before its record reaches the hook).
    pending: dict[str, threading.Event] = field(default_factory=dict)
    _busy: int = 0
    _idle: threading.Condition = field(default_factory=threading.Condition)

    def begin(self) -> None:
        with self._idle:
            self._busy += 1

    def end(self) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is being handled (its hooks included); False on timeout.
        Shutdown calls it before closing the request store, so no answered request is lost."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)


class Handler(BaseHTTPRequestHandler):
    """One HTTP request; the `App` comes from the server object."""

    protocol_version = "HTTP/1.1"
    server_version = "llmops-serve"
    # Headers and body leave in separate writes; with Nagle on, keep-alive clients wait
    # ~40 ms for delayed ACKs on every request.
    disable_nagle_algorithm = True
    timeout = 300  # seconds an idle keep-alive connection may hold a handler thread

    @property
    def app(self) -> App:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        self.app.log(f"{self.address_string()} {format % args}")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        self.app.begin()
        try:
            self._handle_one(method)
        finally:
            self.app.end()

    def _handle_one(self, method: str) -> None:
        t0 = time.perf_counter()
        addr = self.client_address[0]
        rec: dict[str, Any] = {"id": uuid.uuid4().hex, "time": time.time(), "method": method,
                               "path": self.path.split("?", 1)[0], "client": addr,
                               "client_id": client_id(self.headers, addr, self._bearer()),
                               "model": self.app.model_name, "stream": False, "error": None}
        try:
            self._route(method, rec)
        except RequestError as exc:
            rec["error"] = exc.message
            self._send_json(exc.status, exc.body(), rec)
        except (BrokenPipeError, ConnectionResetError):
            rec["error"] = "client disconnected"
            self.close_connection = True
        except Exception as exc:  # never drop the connection without an answer
            rec["error"] = f"{type(exc).__name__}: {exc}"
            self.app.log(f"internal error on {method} {rec['path']}: {rec['error']}")
            body = RequestError(500, "The server had an error while processing your request.", None, None,
                                "server_error").body()
            if not rec.get("status"):
                self._send_json(500, body, rec)
        rec["latency_ms"] = round((time.perf_counter() - t0) * 1000.0, 3)
        if self.app.on_request is not None:
            try:
                self.app.on_request(rec)
            except Exception as exc:  # a broken hook must not break serving
                self.app.log(f"on_request hook failed: {type(exc).__name__}: {exc}")
        logged = self.app.pending.pop(rec.get("response_id") or "", None)
        if logged is not None:
            logged.set()

    def _route(self, method: str, rec: dict[str, Any]) -> None:
        path = rec["path"]
        routes = {("GET", "/health"): self._health, ("GET", "/v1/models"): self._models,
                  ("POST", "/v1/completions"): self._completions, ("POST", "/v1/chat/completions"): self._chat,
                  ("POST", "/v1/feedback"): self._feedback}
        known_paths = {p for _, p in routes}
        body = self._read_body() if method in ("POST", "PUT") else b""
        if path not in known_paths:
            raise RequestError(404, f"Unknown request URL: {method} {path}. Please check the URL for typos.",
                               None, "unknown_url")
        if (method, path) not in routes:
            raise RequestError(405, f"Method {method} is not allowed on {path}.", None, "method_not_allowed")
        if path != "/health":
            self._check_auth()
        routes[(method, path)](body, rec)

    def _bearer(self) -> str | None:
        header = self.headers.get("Authorization", "")
        return (header[7:].strip() or None) if header.lower().startswith("bearer ") else None

    def _check_auth(self) -> None:
        token = self.app.auth_token
        if not token:
            return
        given = self._bearer() or ""
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            raise RequestError(401, "Incorrect API key provided. Send it as `Authorization: Bearer <token>`.",
                               None, "invalid_api_key")

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise RequestError(400, "Invalid Content-Length header.", None) from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(413, f"Request body too large (limit {MAX_BODY_BYTES} bytes).", None)
        return self.rfile.read(length) if length > 0 else b""

    def _json(self, body: bytes) -> Any:
        return api.decode_json(body)

    def _health(self, body: bytes, rec: dict[str, Any]) -> None:
        self._send_json(200, {"status": "ok", "model": self.app.model_name, "instance": self.app.instance,
                              "pid": os.getpid()}, rec)

    def _models(self, body: bytes, rec: dict[str, Any]) -> None:
        self._send_json(200, api.models_response(self.app.model_name, self.app.created), rec)

    def _completions(self, body: bytes, rec: dict[str, Any]) -> None:
        svc = self.app.service
        req = api.parse_completion_request(self._json(body), self.app.model_name, svc.limits)
        self._generate(req, rec)

    def _chat(self, body: bytes, rec: dict[str, Any]) -> None:
        svc = self.app.service
        req = api.parse_chat_request(self._json(body), self.app.model_name, svc.limits)
        self._generate(req, rec)

    def _feedback(self, body: bytes, rec: dict[str, Any]) -> None:
        record = self.app.feedback
        if record is None:
            raise RequestError(404, "Feedback is not enabled on this server: it needs a request store. Add a "
                               "`monitors:` entry for this deployment in llmops.yaml and apply it (or start the "
                               "server with --monitor-store URL).", None, "feedback_disabled")
        payload = self._json(body)
        rid = payload.get("request_id", payload.get("id")) if isinstance(payload, dict) else None
        sent = self.app.pending.get(rid) if isinstance(rid, str) else None
        if sent is not None:
            sent.wait(FEEDBACK_WAIT_S)
        from llmops.monitor.errors import FeedbackError

        try:
            request_id = record(payload)
        except FeedbackError as exc:
            unknown = exc.status == 404
            raise RequestError(exc.status, exc.message, "request_id" if unknown else None,
                               "request_not_found" if unknown else "invalid_feedback") from None
        self._send_json(200, {"status": "recorded", "request_id": request_id}, rec)

    def _generate(self, req: GenerationRequest, rec: dict[str, Any]) -> None:
        rec["stream"] = req.stream
        rec["prompt"] = req.prompts if req.kind == "completion" else req.messages
        rid = api.new_id(req.kind)
        if self.app.feedback is not None:
            self.app.pending[rid] = threading.Event()
        rec["response_id"] = rid
        if req.stream:
            self._stream(req, rid, rec)
            return
        out = self.app.service.generate(req)
        use = api.usage(out.prompt_tokens, out.completion_tokens)
        if req.kind == "chat":
            body = api.chat_response(rid, req.model, out.texts, use)
        else:
            choices = [{"text": text, "index": i, "logprobs": out.logprobs[i] if out.logprobs else None,
                        "finish_reason": reason} for i, (text, reason) in enumerate(out.texts)]
            body = api.completion_response(rid, req.model, choices, use)
        rec.update(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                   completion=[t for t, _ in out.texts], finish_reason=[r for _, r in out.texts])
        self._send_json(200, body, rec)

    def _stream(self, req: GenerationRequest, rid: str, rec: dict[str, Any]) -> None:
        created = int(time.time())
        outcome = Outcome([], 0, 0)
        deltas = self.app.service.stream(req, outcome)
        try:
            first = next(deltas, None)  # validation errors (context length) surface before headers
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            rec["status"] = 200
            if req.kind == "chat":
                self._event(api.stream_chunk("chat", rid, req.model, created, "", None, first=True))
            pending = [first] if first is not None else []
            for piece in _chain(pending, deltas):
                self._event(api.stream_chunk(req.kind, rid, req.model, created, piece, None))
        finally:
            deltas.close()
        reason = outcome.texts[0][1] if outcome.texts else "stop"
        self._event(api.stream_chunk(req.kind, rid, req.model, created, None, reason))
        if req.include_usage:
            use = api.usage(outcome.prompt_tokens, outcome.completion_tokens)
            self._event(api.usage_chunk(req.kind, rid, req.model, created, use))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        rec.update(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens,
                   completion=[t for t, _ in outcome.texts], finish_reason=[reason])

    def _event(self, data: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n")
        self.wfile.flush()

    def _send_json(self, status: int, body: dict[str, Any], rec: dict[str, Any]) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        rec["status"] = status


def _chain(first: list[str], rest: Iterator[str]) -> Iterator[str]:
    yield from first
    yield from rest


class ModelServer(ThreadingHTTPServer):
    """ThreadingHTTPServer carrying the `App`; handler threads are daemons."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        super().__init__(address, Handler)


def make_server(service: ModelService, host: str, port: int, model_name: str, auth_token: str | None = None,
                on_request: OnRequest | None = None, log: Callable[[str], None] | None = None,
                feedback: OnFeedback | None = None) -> ModelServer:
    """Bind (port 0 picks a free one: read `server.server_address`); call `serve_forever()`."""
    app = App(service, model_name, auth_token or None, on_request, feedback)
    if log is not None:
        app.log = log
    return ModelServer((host, port), app)
