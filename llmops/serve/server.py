"""The OpenAI-compatible model server: HTTP in front of `llmops.serve.service.ModelService`.

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

Hostile clients are bounded: at most `max_connections` handler threads (more connections
wait in a 1024-deep listen backlog), a request must arrive within `client_timeout` seconds of
its first byte (408 otherwise, however slowly it trickles), the bearer token is checked before
the body is read, every method other than GET and POST gets a JSON 405, and
`RequestLimits` bounds what one generation may ask for.

The command line (`python -m llmops.serve`) lives in `llmops.serve.main`.
"""

from __future__ import annotations

import hmac
import io
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

from llmops.monitor.records import client_id
from llmops.serve import openai_api as api
from llmops.serve.openai_api import GenerationRequest, RequestError
from llmops.serve.service import ModelService, Outcome

MAX_BODY_BYTES = 4 * 1024 * 1024
LISTEN_BACKLOG = 1024  # connections the kernel holds while every handler thread is busy (the stdlib's is 5)
MAX_CONNECTIONS = 64  # handler threads at most; further connections wait in the backlog
CLIENT_TIMEOUT_S = 30.0  # for a request to arrive once its first byte has, and for an idle keep-alive connection
LINGER_S = 2.0  # after answering without reading a body: how long its rest is drained so the client sees the answer
# Set by whoever starts the server (llmops.serve.process/container): a random token that
# /health repeats, so the starter can tell its own server from anything else on the port.
INSTANCE_ENV = "LLMOPS_SERVE_INSTANCE"
FEEDBACK_WAIT_S = 10.0  # how long feedback waits for its response's record to be logged
OnRequest = Callable[[dict[str, Any]], None]
OnFeedback = Callable[[Any, str | None], str]  # (body, the rater's client id) -> request id


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
    # What is served, for /health and /v1/models: registered version, alias, adapter sha256, prompt.
    served: dict[str, Any] = field(default_factory=dict)
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


class _DeadlineReader(io.RawIOBase):
    """A connection's reading side: a read waits at most `idle_s`, and none goes past `deadline`
    (a `time.monotonic()` time, or None), so a client sending a byte at a time cannot hold a thread."""

    def __init__(self, sock: socket.socket, idle_s: float) -> None:
        super().__init__()
        self.sock = sock
        self.idle_s = idle_s
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        wait = self.idle_s
        if self.deadline is not None:
            wait = min(wait, self.deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(wait)
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.idle_s)  # writes keep the idle timeout


def _drain(sock: socket.socket, seconds: float) -> None:
    """Half-close `sock`, then discard what the client still sends for at most `seconds`. Closing
    with unread input sends a reset, which can destroy the answer before the client reads it."""
    deadline = time.monotonic() + seconds
    try:
        sock.shutdown(socket.SHUT_WR)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                return
    except OSError:
        pass


class Handler(BaseHTTPRequestHandler):
    """The requests of one connection; the `App` and `client_timeout` come from the server object.

    Unlike the standard library's handler, a request must arrive within `timeout` seconds of
    its first byte (408 otherwise), every method reaches `_handle` (a JSON 405, never the
    stdlib's 501 page), malformed requests get JSON errors too, and a body left unread is
    drained before closing (`_drain`).
    """

    protocol_version = "HTTP/1.1"
    server_version = "llmops-serve"
    # Headers and body leave in separate writes; with Nagle on, keep-alive clients wait
    # ~40 ms for delayed ACKs on every request.
    disable_nagle_algorithm = True
    timeout = CLIENT_TIMEOUT_S  # the server's client_timeout replaces it (setup)
    _reader: _DeadlineReader
    _unread_body = False  # the request announced a body this handler has not read
    _expect_100 = False  # the client waits for "100 Continue" before it sends its body
    _linger = False  # drain the connection before closing it

    @property
    def app(self) -> App:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        self.app.log(f"{self.address_string()} {format % args}")

    def setup(self) -> None:
        self.timeout = self.server.client_timeout  # type: ignore[attr-defined]
        super().setup()
        self.rfile.close()
        self._reader = _DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader)

    def finish(self) -> None:
        super().finish()
        if self._linger:
            _drain(self.connection, LINGER_S)

    def handle_one_request(self) -> None:
        """Read one request and answer it (the standard library's loop step, with the limits above)."""
        self.command, self.requestline, self.request_version = None, "", self.protocol_version  # type: ignore
        self._unread_body = self._expect_100 = False
        self._reader.deadline = None  # until the request begins, only the idle timeout applies
        try:
            began = self.rfile.peek(1)
        except OSError:  # idle for the whole timeout (or reset): close without a word, as between requests
            began = b""
        if not began:
            self.close_connection = True
            return
        self._reader.deadline = time.monotonic() + self.timeout  # from its first byte, the whole request
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self._linger = True
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.parse_request():  # it has answered, through send_error
                self._linger = True
                return
            self._unread_body = "Transfer-Encoding" in self.headers or \
                (self.headers.get("Content-Length") or "0").strip() != "0"
            self._handle(self.command)
        except TimeoutError:
            self._timed_out()
        except OSError:  # reset or broken: there is no one to answer
            self.close_connection = True

    def _timed_out(self) -> None:
        """A client too slow to send its request: tell it (it may still read), then drop it."""
        self.log_message("request timed out after %gs", self.timeout)
        try:
            self._refuse(RequestError(408, f"The request did not arrive within {self.timeout:g} seconds.", None,
                                      "request_timeout"))
        except OSError:
            pass
        self.close_connection = True

    def handle_expect_100(self) -> bool:
        self._expect_100 = True  # "100 Continue" goes out in _read_body, once the token has been checked
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own refusals (malformed request line or headers) as OpenAI errors."""
        self._refuse(RequestError(int(code), message or HTTPStatus(code).phrase))

    def _refuse(self, err: RequestError) -> None:
        """Answer a request that never reached `_handle`, and close the connection."""
        self.close_connection = True
        self.request_version = self.protocol_version  # a status line, whatever the request line said
        self._send_json(err.status, err.body(), {}, err.headers)

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
            self._send_json(exc.status, exc.body(), rec, exc.headers)
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as exc:
            rec["error"] = "client timed out" if isinstance(exc, TimeoutError) else "client disconnected"
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
        allowed = sorted(m for m, p in routes if p == path)
        if not allowed:
            raise RequestError(404, f"Unknown request URL: {method} {path[:200]}. Please check the URL for typos.",
                               None, "unknown_url")
        if (method, path) not in routes:
            raise RequestError(405, f"Method {method[:20]} is not allowed on {path}; use {' or '.join(allowed)}.",
                               None, "method_not_allowed", headers={"Allow": ", ".join(allowed)})
        if path != "/health":
            self._check_auth()  # before the body: a refused client's body is never read
        body = self._read_body() if method == "POST" else b""
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
        """The body its Content-Length announces; a refusal before this leaves it unread (and drained)."""
        if "Transfer-Encoding" in self.headers:
            raise RequestError(411, "Chunked request bodies are not supported; send a Content-Length header.", None)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            raise RequestError(400, "Invalid Content-Length header.", None)
        if length > MAX_BODY_BYTES:
            raise RequestError(413, f"Request body too large (limit {MAX_BODY_BYTES} bytes).", None)
        if length == 0:
            return b""
        if self._expect_100:
            self.send_response_only(HTTPStatus.CONTINUE)
            self.end_headers()
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self._unread_body, self.close_connection = False, True  # a stalled client: no draining
            raise RequestError(408, f"The request body did not arrive within {self.timeout:g} seconds of the "
                               "request's start.", None, "request_timeout") from None
        self._unread_body = False
        if len(body) < length:
            self.close_connection = True
            raise RequestError(400, f"The request body ended after {len(body)} of the {length} bytes its "
                               "Content-Length announced.", None)
        return body

    def _json(self, body: bytes) -> Any:
        return api.decode_json(body)

    def _health(self, body: bytes, rec: dict[str, Any]) -> None:
        self._send_json(200, {"status": "ok", "model": self.app.model_name, **self.app.served,
                              "instance": self.app.instance, "pid": os.getpid()}, rec)

    def _models(self, body: bytes, rec: dict[str, Any]) -> None:
        self._send_json(200, api.models_response(self.app.model_name, self.app.created, self.app.served), rec)

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
            request_id = record(payload, rec.get("client_id"))
        except FeedbackError as exc:
            unknown = exc.status == 404
            raise RequestError(exc.status, exc.message, "request_id" if unknown else None,
                               "request_not_found" if unknown else "invalid_feedback") from None
        self._send_json(200, {"status": "recorded", "request_id": request_id}, rec)

    def _generate(self, req: GenerationRequest, rec: dict[str, Any]) -> None:
        rec["stream"] = req.stream
        rec["prompt"] = req.prompts if req.kind == "completion" else req.messages
        if req.user and not self.headers.get("X-Client-Id", "").strip():
            rec["client_id"] = f"user:{req.user}"  # OpenAI's `user`: the end user, named by the client
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
        self._record_rendered(out, rec)
        self._send_json(200, body, rec)

    @staticmethod
    def _record_rendered(out: Outcome, rec: dict[str, Any]) -> None:
        """A chat put through the deployment's prompt is recorded as the model saw it (the
        rendered text, like a completion's): the monitor then compares chat traffic with the
        training split in the same space. Either kind keeps the prompt variables it filled,
        which is what a feedback export turns into training rows."""
        if out.inputs is not None:
            rec["inputs"] = out.inputs
            if rec.get("path") == "/v1/chat/completions":
                rec["prompt"] = out.prompts

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
        self._record_rendered(outcome, rec)

    def _event(self, data: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n")
        self.wfile.flush()

    def _send_json(self, status: int, body: dict[str, Any], rec: dict[str, Any],
                   headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        if self._unread_body:  # answered without reading it: the connection cannot carry another request
            self.close_connection = self._linger = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has headers only
            self.wfile.write(data)
        rec["status"] = status


def _chain(first: list[str], rest: Iterator[str]) -> Iterator[str]:
    yield from first
    yield from rest


class ModelServer(ThreadingHTTPServer):
    """ThreadingHTTPServer carrying the `App`, with at most `max_connections` handler threads.

    A connection is accepted only once a handler slot is free, so under load connections wait
    in the kernel's listen backlog (`LISTEN_BACKLOG` deep), not in a thread each. Handler
    threads are daemons, and closing does not wait for them: shutdown waits for running
    requests (`App.wait_idle`), not for idle keep-alive connections.
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], app: App, max_connections: int = MAX_CONNECTIONS,
                 client_timeout: float = CLIENT_TIMEOUT_S) -> None:
        if max_connections < 1 or not client_timeout > 0:
            raise ValueError(f"max_connections must be >= 1 and client_timeout > 0, got {max_connections} and "
                             f"{client_timeout}")
        self.app = app
        self.client_timeout = client_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stopping = threading.Event()
        super().__init__(address, Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        while not self._slots.acquire(timeout=0.1):
            if self._stopping.is_set():  # serve_forever skips this round and sees its shutdown request
                raise OSError("the server is shutting down")
        try:
            return super().get_request()
        except BaseException:
            self._slots.release()
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started, so none will release the slot
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown(self) -> None:
        self._stopping.set()
        super().shutdown()


def make_server(service: ModelService, host: str, port: int, model_name: str, auth_token: str | None = None,
                on_request: OnRequest | None = None, log: Callable[[str], None] | None = None,
                feedback: OnFeedback | None = None, max_connections: int = MAX_CONNECTIONS,
                client_timeout: float = CLIENT_TIMEOUT_S, served: dict[str, Any] | None = None) -> ModelServer:
    """Bind (port 0 picks a free one: read `server.server_address`); call `serve_forever()`.

    `max_connections` bounds the handler threads; `client_timeout` is how long a request may
    take to arrive after its first byte, and how long an idle connection is kept.
    """
    app = App(service, model_name, auth_token or None, on_request, feedback, served=dict(served or {}))
    if log is not None:
        app.log = log
    return ModelServer((host, port), app, max_connections, client_timeout)
