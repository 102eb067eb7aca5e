"""The OpenAI-compatible model server: a Starlette app on uvicorn in front of `ModelService`.

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

The stack is uvicorn's asyncio + h11 server with a Starlette app; blocking work (generation,
hooks, feedback) runs in worker threads, at most `max_connections` requests at once (more get
a JSON 503 with Retry-After). Hostile clients are bounded by `_Protocol`: a request must
arrive within `client_timeout` seconds of its first byte (408 otherwise, however slowly it
trickles), idle connections are closed after `client_timeout`, malformed requests get JSON
errors. The bearer token is checked before the body is read, every method other than GET
and POST gets a JSON 405, and `RequestLimits` bounds what one generation may ask for. A body
left unread (a refused request) is drained by the server while the connection stays open,
so the client always sees the answer.

Shutdown (`ModelServer.shutdown`, or SIGTERM/SIGINT when `serve_forever` runs in the main
thread) stops accepting connections, lets running requests finish and be logged, for at most
`grace` seconds, then returns. The command line (`python -m llmops.serve`) lives in
`llmops.serve.main`.
"""

from __future__ import annotations

import hmac
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, AsyncIterator, Callable

from llmops.monitor.records import client_id
from llmops.serve import openai_api as api
from llmops.serve.openai_api import GenerationRequest, RequestError
from llmops.serve.service import ModelService, Outcome

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024  # request line and headers together; beyond, 414 or 431
MAX_HEADERS = 100
LINGER_S = 2.0  # closing with a request's body unread: how long its rest is drained so the client sees the answer
LISTEN_BACKLOG = 1024  # connections the kernel holds before the server accepts them
MAX_CONNECTIONS = 64  # requests handled at once; more get 503 with Retry-After
CLIENT_TIMEOUT_S = 30.0  # for a request to arrive once its first byte has, and for an idle keep-alive connection
SHUTDOWN_GRACE_S = 10.0  # how long running requests get to finish at shutdown
# Set by whoever starts the server (llmops.serve.process/container): a random token that
# /health repeats, so the starter can tell its own server from anything else on the port.
INSTANCE_ENV = "LLMOPS_SERVE_INSTANCE"
FEEDBACK_WAIT_S = 10.0  # how long feedback waits for its response's record to be logged
DEADLINE_KEY = "llmops.deadline"  # scope key: the loop time by which the request must have arrived
OnRequest = Callable[[dict[str, Any]], None]
OnFeedback = Callable[[Any, str | None], str]  # (body, the rater's client id) -> request id


@dataclass
class App:
    """Everything a request needs; shared by all requests."""

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
    max_connections: int = MAX_CONNECTIONS
    client_timeout: float = CLIENT_TIMEOUT_S
    _busy: int = 0
    peak: int = 0  # most requests handled at once (for tests and benchmarks)
    _idle: threading.Condition = field(default_factory=threading.Condition)

    def begin(self) -> bool:
        """Count a request in; False (not counted) when `max_connections` are being handled."""
        with self._idle:
            if self._busy >= self.max_connections:
                return False
            self._busy += 1
            self.peak = max(self.peak, self._busy)
            return True

    def end(self) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is being handled (its hooks included); False on timeout.
        Shutdown calls it before closing the request store, so no answered request is lost."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)


def _json_bytes(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


class _Refused(Exception):
    """Raised inside a request to answer with `err` (and `close` the connection after it)."""


class Endpoints:
    """The Starlette side: one catch-all route dispatching on (method, path), so unknown
    paths are a JSON 404 and other methods (HEAD, OPTIONS included) a JSON 405 with Allow."""

    def __init__(self, app: App) -> None:
        import anyio

        self.app = app
        self.limiter = anyio.CapacityLimiter(max(app.max_connections, 1) + 8)
        self.routes = {("GET", "/health"): self._health, ("GET", "/v1/models"): self._models,
                       ("POST", "/v1/completions"): self._completions,
                       ("POST", "/v1/chat/completions"): self._chat, ("POST", "/v1/feedback"): self._feedback}

    def asgi(self) -> Any:
        from starlette.applications import Starlette
        from starlette.routing import Mount, request_response

        return Starlette(routes=[Mount("/", app=request_response(self.endpoint))])

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        import anyio

        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def endpoint(self, request: Any) -> Any:
        from starlette.background import BackgroundTask
        from starlette.responses import Response

        app = self.app
        t0 = time.perf_counter()
        addr = request.client.host if request.client else ""
        rec: dict[str, Any] = {"id": uuid.uuid4().hex, "time": time.time(), "method": request.method,
                               "path": request.url.path, "client": addr,
                               "client_id": client_id(request.headers, addr, _bearer(request)),
                               "model": app.model_name, "stream": False, "error": None}
        request.state.t0 = t0
        if not app.begin():
            err = RequestError(503, f"The server is busy: it handles {app.max_connections} requests at once. Retry "
                               "in a moment.", None, "server_busy", type_="server_error", headers={"Retry-After": "1"})
            rec.update(status=503, error=err.message)
            response = self._json(err.status, err.body(), err.headers)
            response.background = BackgroundTask(self._logged, rec, t0, False)
            return response
        try:
            response = await self._route(request, rec)
        except RequestError as exc:
            rec["error"] = exc.message
            response = self._json(exc.status, exc.body(), exc.headers)
        except Exception as exc:  # never drop the connection without an answer
            from starlette.requests import ClientDisconnect

            if isinstance(exc, ClientDisconnect):
                rec["error"] = "client disconnected"
                response = Response(status_code=499)
            else:
                rec["error"] = f"{type(exc).__name__}: {exc}"
                app.log(f"internal error on {request.method} {rec['path']}: {rec['error']}")
                body = RequestError(500, "The server had an error while processing your request.", None, None,
                                    "server_error").body()
                response = self._json(500, body)
        if getattr(response, "streams", False):  # the stream's own end logs it
            return response
        rec["status"] = response.status_code
        response.background = BackgroundTask(self._logged, rec, t0)
        return response

    async def _logged(self, rec: dict[str, Any], t0: float, counted: bool = True) -> None:
        """After the answer is sent: the request's record to the hook, then the request is done
        (`counted`: it was counted in by `App.begin`)."""
        import anyio

        try:
            with anyio.CancelScope(shield=True):
                rec["latency_ms"] = round((time.perf_counter() - t0) * 1000.0, 3)
                if self.app.on_request is not None:
                    await anyio.to_thread.run_sync(self._hook, rec)
                logged = self.app.pending.pop(rec.get("response_id") or "", None)
                if logged is not None:
                    logged.set()
        finally:
            if counted:
                self.app.end()

    def _hook(self, rec: dict[str, Any]) -> None:
        try:
            self.app.on_request(rec)  # type: ignore[misc]
        except Exception as exc:  # a broken hook must not break serving
            self.app.log(f"on_request hook failed: {type(exc).__name__}: {exc}")

    @staticmethod
    def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Any:
        from starlette.responses import Response

        return Response(_json_bytes(body), status_code=status, headers=headers, media_type="application/json")

    async def _route(self, request: Any, rec: dict[str, Any]) -> Any:
        method, path = request.method, rec["path"]
        raw = request.headers.raw
        if len(raw) > MAX_HEADERS or sum(len(k) + len(v) + 4 for k, v in raw) > MAX_HEADER_BYTES:
            raise RequestError(431, f"The request headers are too large: at most {MAX_HEADERS} headers and "
                               f"{MAX_HEADER_BYTES} bytes are accepted.", None, headers={"Connection": "close"})
        if len(request.scope.get("raw_path") or b"") + len(request.scope.get("query_string") or b"") \
                > MAX_HEADER_BYTES:
            raise RequestError(414, f"The request URL is longer than {MAX_HEADER_BYTES} bytes.", None,
                               headers={"Connection": "close"})
        allowed = sorted(m for m, p in self.routes if p == path)
        if not allowed:
            raise RequestError(404, f"Unknown request URL: {method[:20]} {path[:200]}. Please check the URL for "
                               "typos.", None, "unknown_url")
        if (method, path) not in self.routes:
            raise RequestError(405, f"Method {method[:20]} is not allowed on {path}; use {' or '.join(allowed)}.",
                               None, "method_not_allowed", headers={"Allow": ", ".join(allowed)})
        if path != "/health":
            self._check_auth(request)  # before the body: a refused client's body is never read
        body = await self._read_body(request) if method == "POST" else b""
        return await self.routes[(method, path)](request, body, rec)

    def _check_auth(self, request: Any) -> None:
        token = self.app.auth_token
        if not token:
            return
        given = _bearer(request) or ""
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            raise RequestError(401, "Incorrect API key provided. Send it as `Authorization: Bearer <token>`.",
                               None, "invalid_api_key")

    async def _read_body(self, request: Any) -> bytes:
        """The body its Content-Length announces, read by the request's deadline (408 after it);
        a refusal before this leaves it unread, and the server drains it."""
        import asyncio

        headers = request.headers
        if "transfer-encoding" in headers:
            raise RequestError(411, "Chunked request bodies are not supported; send a Content-Length header.", None,
                               headers={"Connection": "close"})
        length = int(headers.get("content-length") or 0)  # h11 has refused malformed lengths
        if length > MAX_BODY_BYTES:
            raise RequestError(413, f"Request body too large (limit {MAX_BODY_BYTES} bytes).", None)
        if length == 0:
            return b""
        loop = asyncio.get_running_loop()
        deadline = request.scope.get(DEADLINE_KEY) or loop.time() + self.app.client_timeout
        chunks: list[bytes] = []

        async def read() -> None:
            async for chunk in request.stream():
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), max(deadline - loop.time(), 0.001))
        except asyncio.TimeoutError:
            raise RequestError(408, f"The request body did not arrive within {self.app.client_timeout:g} seconds "
                               "of the request's start.", None, "request_timeout",
                               headers={"Connection": "close"}) from None
        return b"".join(chunks)

    async def _health(self, request: Any, body: bytes, rec: dict[str, Any]) -> Any:
        return self._json(200, {"status": "ok", "model": self.app.model_name, **self.app.served,
                                "instance": self.app.instance, "pid": os.getpid()})

    async def _models(self, request: Any, body: bytes, rec: dict[str, Any]) -> Any:
        return self._json(200, api.models_response(self.app.model_name, self.app.created, self.app.served))

    async def _completions(self, request: Any, body: bytes, rec: dict[str, Any]) -> Any:
        req = api.parse_completion_request(api.decode_json(body), self.app.model_name, self.app.service.limits)
        return await self._generate(request, req, rec)

    async def _chat(self, request: Any, body: bytes, rec: dict[str, Any]) -> Any:
        req = api.parse_chat_request(api.decode_json(body), self.app.model_name, self.app.service.limits)
        return await self._generate(request, req, rec)

    async def _feedback(self, request: Any, body: bytes, rec: dict[str, Any]) -> Any:
        record = self.app.feedback
        if record is None:
            raise RequestError(404, "Feedback is not enabled on this server: it needs a request store. Add a "
                               "`monitors:` entry for this deployment in llmops.yaml and apply it (or start the "
                               "server with --monitor-store URL).", None, "feedback_disabled")
        payload = api.decode_json(body)
        return self._json(200, await self._thread(self._record_feedback, record, payload, rec.get("client_id")))

    def _record_feedback(self, record: OnFeedback, payload: Any, rater: str | None) -> dict[str, Any]:
        from llmops.monitor.errors import FeedbackError

        rid = payload.get("request_id", payload.get("id")) if isinstance(payload, dict) else None
        sent = self.app.pending.get(rid) if isinstance(rid, str) else None
        if sent is not None:
            sent.wait(FEEDBACK_WAIT_S)
        try:
            request_id = record(payload, rater)
        except FeedbackError as exc:
            unknown = exc.status == 404
            raise RequestError(exc.status, exc.message, "request_id" if unknown else None,
                               "request_not_found" if unknown else "invalid_feedback") from None
        return {"status": "recorded", "request_id": request_id}

    async def _generate(self, request: Any, req: GenerationRequest, rec: dict[str, Any]) -> Any:
        rec["stream"] = req.stream
        rec["prompt"] = req.prompts if req.kind == "completion" else req.messages
        if req.user and not request.headers.get("x-client-id", "").strip():
            rec["client_id"] = f"user:{req.user}"  # OpenAI's `user`: the end user, named by the client
        rid = api.new_id(req.kind)
        if self.app.feedback is not None:
            self.app.pending[rid] = threading.Event()
        rec["response_id"] = rid
        if req.stream:
            return await self._stream(req, rid, rec, request.state.t0)
        out = await self._thread(self.app.service.generate, req)
        use = api.usage(out.prompt_tokens, out.completion_tokens)
        if req.kind == "chat":
            body = api.chat_response(rid, req.model, out.texts, use)
        else:
            choices = [{"text": text, "index": i, "logprobs": out.logprobs[i] if out.logprobs else None,
                        "finish_reason": reason} for i, (text, reason) in enumerate(out.texts)]
            body = api.completion_response(rid, req.model, choices, use)
        rec.update(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                   completion=[t for t, _ in out.texts], finish_reason=[r for _, r in out.texts])
        _record_rendered(out, rec)
        return self._json(200, body)

    async def _stream(self, req: GenerationRequest, rid: str, rec: dict[str, Any], t0: float) -> Any:
        import anyio

        created = int(time.time())
        outcome = Outcome([], 0, 0)
        deltas = self.app.service.stream(req, outcome)
        first = await self._thread(next, deltas, None)  # validation errors (context length) surface before headers
        state = {"reason": "stop", "done": False}

        async def finish() -> None:
            """Once, however the stream ended (completed, client gone, never started)."""
            if state["done"]:
                return
            state["done"] = True
            with anyio.CancelScope(shield=True):
                await self._thread(deltas.close)  # a stream left early stops generating
                rec.update(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens,
                           completion=[t for t, _ in outcome.texts], finish_reason=[state["reason"]])
                _record_rendered(outcome, rec)
                await self._logged(rec, t0)

        async def events() -> AsyncIterator[bytes]:
            try:
                if req.kind == "chat":
                    yield _event(api.stream_chunk("chat", rid, req.model, created, "", None, first=True))
                piece = first
                while piece is not None:
                    yield _event(api.stream_chunk(req.kind, rid, req.model, created, piece, None))
                    piece = await self._thread(next, deltas, None)
                state["reason"] = reason = outcome.texts[0][1] if outcome.texts else "stop"
                yield _event(api.stream_chunk(req.kind, rid, req.model, created, None, reason))
                if req.include_usage:
                    use = api.usage(outcome.prompt_tokens, outcome.completion_tokens)
                    yield _event(api.usage_chunk(req.kind, rid, req.model, created, use))
                yield b"data: [DONE]\n\n"
            except BaseException:
                rec["error"] = "client disconnected"
                raise
            finally:
                await finish()

        rec["status"] = 200
        return _Stream(events(), finish, media_type="text/event-stream; charset=utf-8",
                       headers={"Cache-Control": "no-cache"})


def _stream_class() -> type:
    from starlette.responses import StreamingResponse

    class _Stream(StreamingResponse):
        """Server-sent events whose `finish` runs however the response ends."""

        streams = True

        def __init__(self, content: Any, finish: Callable[[], Any], **kwargs: Any) -> None:
            super().__init__(content, **kwargs)
            self.finish = finish

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                await self.finish()

    return _Stream


def _Stream(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - a class, built on first use
    global _STREAM
    if _STREAM is None:
        _STREAM = _stream_class()
    return _STREAM(*args, **kwargs)


_STREAM: type | None = None


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + _json_bytes(data) + b"\n\n"


def _bearer(request: Any) -> str | None:
    header = request.headers.get("authorization", "")
    return (header[7:].strip() or None) if header.lower().startswith("bearer ") else None


def _record_rendered(out: Outcome, rec: dict[str, Any]) -> None:
    """A chat put through the deployment's prompt is recorded as the model saw it (the
    rendered text, like a completion's): the monitor then compares chat traffic with the
    training split in the same space. Either kind keeps the prompt variables it filled,
    which is what a feedback export turns into training rows."""
    if out.inputs is not None:
        rec["inputs"] = out.inputs
        if rec.get("path") == "/v1/chat/completions":
            rec["prompt"] = out.prompts


def _error_bytes(status: int, message: str, code: str | None = None) -> bytes:
    """A whole HTTP/1.1 answer, for refusals made before any request was parsed."""
    body = _json_bytes(RequestError(status, message, None, code).body())
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + body


def _protocol_class() -> type:
    """uvicorn's h11 protocol with deadlines: an idle connection (fresh or between requests) is
    closed after `timeout_keep_alive`; a request must have arrived within that many seconds of
    its first byte (the app reads its body by the same deadline); malformed requests get JSON."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class _Protocol(H11Protocol):
        _deadline: Any = None
        _deadline_at: float = 0.0

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(_Lingering(transport, self))
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():  # lingering: what the client still sends is discarded
                return
            if self._deadline is None and self.conn.their_state is h11.IDLE:  # a request begins
                self._deadline_at = self.loop.time() + self.timeout_keep_alive
                self._deadline = self.loop.call_at(self._deadline_at, self._too_slow)
            before = self.cycle
            super().data_received(data)
            if self.cycle is not before and self.scope is not None:
                self.scope[DEADLINE_KEY] = self._deadline_at  # type: ignore[literal-required]
            if self._deadline is not None and self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                self._deadline.cancel()  # the whole request is here
                self._deadline = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._deadline is not None and self.conn.their_state is h11.IDLE:
                self._deadline.cancel()  # pipelined: the next request starts its own deadline
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete and self.conn.their_state is h11.SEND_BODY:
                return  # the app reads the body and answers 408 itself, by the same deadline
            if cycle is None or cycle.response_complete and self.conn.their_state is h11.IDLE:
                self.transport.write(_error_bytes(408, f"The request did not arrive within "
                                                  f"{self.timeout_keep_alive:g} seconds.", "request_timeout"))
            self.transport.close()  # (or: answered without its body, whose rest never came)

        def send_400_response(self, msg: str) -> None:
            buffer = self.conn.trailing_data[0]
            status, message = 400, "Invalid HTTP request received: check the request line and headers."
            if len(buffer) >= MAX_HEADER_BYTES:
                line_end = buffer.find(b"\r\n")
                if line_end == -1 or line_end >= MAX_HEADER_BYTES:
                    status, message = 414, f"The request line is longer than {MAX_HEADER_BYTES} bytes."
                else:
                    status, message = 431, f"The request headers are longer than {MAX_HEADER_BYTES} bytes."
            self.transport.write(_error_bytes(status, message))
            self.transport.close()

    return _Protocol


class _Lingering:
    """A connection's transport whose `close` keeps reading (and discarding) for `LINGER_S`
    after a half-close when the request was not read to its end: closing with unread input
    sends a reset, which can destroy the answer before the client reads it."""

    def __init__(self, transport: Any, protocol: Any) -> None:
        self._transport, self._protocol, self._lingering = transport, protocol, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._lingering or self._transport.is_closing()

    def close(self) -> None:
        import h11

        transport = self._transport
        if self._lingering or transport.is_closing():
            return
        conn = self._protocol.conn
        buffered, ended = conn.trailing_data
        unread = not ended and (conn.their_state in (h11.SEND_BODY, h11.ERROR) or
                                conn.their_state is h11.IDLE and bool(buffered))
        if not unread or not transport.can_write_eof():
            transport.close()
            return
        self._lingering = True
        try:
            transport.write_eof()
            transport.resume_reading()
        except (OSError, RuntimeError):
            transport.close()
            return
        self._protocol.loop.call_later(LINGER_S, transport.close)


class ModelServer:
    """uvicorn serving the app on a socket bound at construction (port 0: `server_address`
    has the one picked). `serve_forever` blocks until `shutdown` (or, in the main thread, until
    SIGTERM/SIGINT), then waits up to `grace` seconds for running requests."""

    def __init__(self, address: tuple[str, int], app: App, grace: float = SHUTDOWN_GRACE_S) -> None:
        import uvicorn

        self.app = app
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind(address)
            self.socket.listen(LISTEN_BACKLOG)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
        self.endpoints = Endpoints(app)
        config = uvicorn.Config(self.endpoints.asgi(), http=_protocol_class(), lifespan="off", log_config=None,
                                log_level="warning", access_log=False, server_header=False,
                                timeout_keep_alive=app.client_timeout, timeout_graceful_shutdown=grace,
                                h11_max_incomplete_event_size=MAX_HEADER_BYTES, backlog=LISTEN_BACKLOG)
        self.uvicorn = uvicorn.Server(config)
        self._stopped = threading.Event()

    def serve_forever(self, poll_interval: float | None = None) -> None:
        """Serve until `shutdown()` (or a signal, in the main thread). `poll_interval` is ignored."""
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    @property
    def signalled(self) -> list[int]:
        """The signals that ended `serve_forever` (uvicorn raises them again once it returns)."""
        return self.uvicorn._captured_signals

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop serving; returns once running requests finished (or the grace period ended)."""
        self.uvicorn.should_exit = True
        self._stopped.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()


def make_server(service: ModelService, host: str, port: int, model_name: str, auth_token: str | None = None,
                on_request: OnRequest | None = None, log: Callable[[str], None] | None = None,
                feedback: OnFeedback | None = None, max_connections: int = MAX_CONNECTIONS,
                client_timeout: float = CLIENT_TIMEOUT_S, served: dict[str, Any] | None = None,
                grace: float = SHUTDOWN_GRACE_S) -> ModelServer:
    """Bind (port 0 picks a free one: read `server.server_address`); call `serve_forever()`.

    `max_connections` bounds the requests handled at once; `client_timeout` is how long a
    request may take to arrive after its first byte, and how long an idle connection is kept;
    `grace` how long running requests get to finish at shutdown.
    """
    if max_connections < 1 or not client_timeout > 0:
        raise ValueError(f"max_connections must be >= 1 and client_timeout > 0, got {max_connections} and "
                         f"{client_timeout}")
    app = App(service, model_name, auth_token or None, on_request, feedback, served=dict(served or {}),
              max_connections=max_connections, client_timeout=client_timeout)
    if log is not None:
        app.log = log
    return ModelServer((host, port), app, grace)
