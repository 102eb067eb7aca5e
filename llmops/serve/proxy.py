"""A thin logging proxy in front of an OpenAI-compatible server (vLLM, for `serve.engine: vllm`).

`python -m llmops.serve.proxy --upstream URL ...` serves the routes the built-in server has and
forwards them to the upstream: POST /v1/completions and /v1/chat/completions (streaming
included, chunk by chunk as they arrive), GET /v1/models and GET /health. Every forwarded
request becomes the same flat record the built-in server hands its `on_request` hook (see
`llmops.serve.server`): id, time, path, client id (`X-Client-Id`, else a hash of the bearer
token, else the address; OpenAI's `user` when no `X-Client-Id` is sent), status, error,
latency, the upstream's response id, prompt, completion and token counts. So a monitor reads a
vLLM deployment's traffic exactly as a built-in one's, and POST /v1/feedback, answered here
from the request store, rates answers by the ids clients saw.

The client's bearer token is checked here (`--auth-token-env`, as the built-in server does)
and never forwarded: the proxy sends the upstream the key in `--upstream-key-env` instead (the
random key the vLLM container was started with), so the container's port, bound to loopback,
answers nobody else. Only requests for the deployment's model (`--model-name`) are forwarded;
others get OpenAI's 404. An upstream that does not answer gets 502 with a JSON error naming it;
the upstream's own 4xx/5xx answers pass through as they are. /health answers 200 (with the
instance token of `llmops.serve.process`) only while the upstream's /health does, else 503.

The arguments are those of `python -m llmops.serve` (`llmops.serve.endpoint.server_args`), so
`start_server(..., module="llmops.serve.proxy")` starts, checks and stops it like the built-in
server. It runs on Starlette and uvicorn; upstream calls go through httpx.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

try:  # the maintained httpx is published as httpx2 in this environment; either works
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed distribution
    import httpx  # type: ignore[no-redef]

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmops.monitor.records import client_id
from llmops.serve.openai_api import RequestError

INSTANCE_ENV = "LLMOPS_SERVE_INSTANCE"  # the same variable as llmops.serve.server.INSTANCE_ENV
UPSTREAM_KEY_ENV = "LLMOPS_UPSTREAM_API_KEY"
MAX_BODY_BYTES = 4 * 1024 * 1024
UPSTREAM_TIMEOUT_S = 600.0
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
OnRequest = Callable[[dict[str, Any]], None]
OnFeedback = Callable[[Any, "str | None"], str]
# Headers not copied from an upstream answer: hop-by-hop, or recomputed by this server.
_DROPPED = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "server",
            "date"}


class Proxy:
    """What the routes share: the upstream, the hooks and what /health reports."""

    def __init__(self, upstream: str, model_name: str, *, upstream_key: str | None = None,
                 auth_token: str | None = None, on_request: OnRequest | None = None,
                 feedback: OnFeedback | None = None, served: dict[str, Any] | None = None,
                 engine: str = "vllm", timeout: float = UPSTREAM_TIMEOUT_S,
                 log: Callable[[str], None] = lambda line: None) -> None:
        self.upstream = upstream.rstrip("/")
        self.model_name = model_name
        self.upstream_key = upstream_key or None
        self.auth_token = auth_token or None
        self.on_request = on_request
        self.feedback = feedback
        self.served = dict(served or {})
        self.engine = engine
        self.timeout = timeout
        self.log = log
        self.instance = os.environ.get(INSTANCE_ENV) or None
        self.client: httpx.AsyncClient | None = None

    # -- plumbing -----------------------------------------------------------------------
    def http(self) -> httpx.AsyncClient:
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=5.0))
        return self.client

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.upstream_key:
            headers["Authorization"] = f"Bearer {self.upstream_key}"
        return headers

    def _unreachable(self, exc: Exception) -> RequestError:
        what = type(exc).__name__
        detail = str(exc).strip()
        return RequestError(502, f"The {self.engine} server behind this endpoint ({self.upstream}) did not answer "
                            f"({what}{': ' + detail if detail else ''}); check its container with `docker ps` and "
                            "`docker logs`, or re-run `llmops apply`.", None, "upstream_unavailable",
                            type_="server_error")

    def record(self, rec: dict[str, Any]) -> None:
        if self.on_request is None:
            return
        try:
            self.on_request(rec)
        except Exception as exc:  # noqa: BLE001 - a broken hook must not break serving
            self.log(f"on_request hook failed: {type(exc).__name__}: {exc}")

    def check_auth(self, request: Request) -> None:
        if not self.auth_token:
            return
        given = _bearer(request) or ""
        if not given or not hmac.compare_digest(given.encode(), self.auth_token.encode()):
            raise RequestError(401, "Incorrect API key provided. Send it as `Authorization: Bearer <token>`.",
                               None, "invalid_api_key")


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return (header[7:].strip() or None) if header.lower().startswith("bearer ") else None


def _error(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)


def _new_record(proxy: Proxy, request: Request) -> dict[str, Any]:
    addr = request.client.host if request.client else ""
    return {"id": uuid.uuid4().hex, "time": time.time(), "method": request.method, "path": request.url.path,
            "client": addr, "client_id": client_id(request.headers, addr, _bearer(request)),
            "model": proxy.model_name, "stream": False, "error": None}


async def _read_json(request: Request) -> Any:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(413, f"Request body too large (limit {MAX_BODY_BYTES} bytes).", None)
    try:
        return json.loads(body or b"null")
    except ValueError:
        raise RequestError(400, "The request body is not valid JSON.", None, "invalid_json") from None


def _upstream_error(payload: Any) -> str:
    """The message of an upstream error body (OpenAI's shape or vLLM's), for the record."""
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict):
            return str(err.get("message") or err)[:1000]
        return str(err)[:1000]
    return str(payload)[:1000]


def _texts(kind: str, choices: Any) -> tuple[list[str], list[Any]]:
    """(completion texts, finish reasons) of a non-streaming answer's choices."""
    texts, reasons = [], []
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        if kind == "chat":
            message = choice.get("message") or {}
            texts.append(str(message.get("content") or "") if isinstance(message, dict) else "")
        else:
            texts.append(str(choice.get("text") or ""))
        reasons.append(choice.get("finish_reason"))
    return texts, reasons


def _usage(rec: dict[str, Any], usage: Any) -> None:
    if isinstance(usage, dict):
        rec["prompt_tokens"] = usage.get("prompt_tokens")
        rec["completion_tokens"] = usage.get("completion_tokens")


# -- routes -------------------------------------------------------------------------------


async def health(request: Request) -> Response:
    proxy: Proxy = request.app.state.proxy
    try:
        answer = await proxy.http().get(proxy.upstream + "/health", timeout=5.0)
    except httpx.HTTPError as exc:
        return JSONResponse({"status": "unavailable", "model": proxy.model_name, "engine": proxy.engine,
                             "error": proxy._unreachable(exc).message}, status_code=503)
    if answer.status_code != 200:
        return JSONResponse({"status": "unavailable", "model": proxy.model_name, "engine": proxy.engine,
                             "error": f"the {proxy.engine} server's /health answered {answer.status_code}"},
                            status_code=503)
    return JSONResponse({"status": "ok", "model": proxy.model_name, **proxy.served, "engine": proxy.engine,
                         "instance": proxy.instance, "pid": os.getpid()})


async def models(request: Request) -> Response:
    proxy: Proxy = request.app.state.proxy
    try:
        proxy.check_auth(request)
        answer = await proxy.http().get(proxy.upstream + "/v1/models", headers=proxy._headers())
    except RequestError as exc:
        return _error(exc)
    except httpx.HTTPError as exc:
        return _error(proxy._unreachable(exc))
    return Response(answer.content, status_code=answer.status_code, headers=_copied(answer.headers))


def _copied(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _DROPPED}


async def generate(request: Request) -> Response:
    """Forward a completion or chat request; record it once answered (streams: once done)."""
    proxy: Proxy = request.app.state.proxy
    t0 = time.perf_counter()
    rec = _new_record(proxy, request)
    kind = "chat" if rec["path"] == "/v1/chat/completions" else "completion"

    def done(status: int, error: str | None = None) -> None:
        rec["status"], rec["error"] = status, error
        rec["latency_ms"] = round((time.perf_counter() - t0) * 1000.0, 3)
        proxy.record(rec)

    try:
        proxy.check_auth(request)
        body = await _read_json(request)
        if not isinstance(body, dict):
            raise RequestError(400, "The request body must be a JSON object.", None)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError(400, "You must provide a model parameter.", "model")
        if model != proxy.model_name:
            raise RequestError(404, f"The model `{model[:100]}` does not exist or you do not have access to it.",
                               "model", "model_not_found")
        rec["prompt"] = body.get("prompt") if kind == "completion" else body.get("messages")
        user = body.get("user")
        if isinstance(user, str) and user and not request.headers.get("x-client-id", "").strip():
            rec["client_id"] = f"user:{user[:120]}"  # OpenAI's `user`: the end user, named by the client
        rec["stream"] = bool(body.get("stream"))
    except RequestError as exc:
        done(exc.status, exc.message)
        return _error(exc)
    url = proxy.upstream + rec["path"]
    if rec["stream"]:
        return await _stream(proxy, url, body, kind, rec, done)
    try:
        answer = await proxy.http().post(url, json=body, headers=proxy._headers())
    except httpx.HTTPError as exc:
        err = proxy._unreachable(exc)
        done(err.status, err.message)
        return _error(err)
    try:
        payload = answer.json()
    except ValueError:
        payload = None
    if answer.status_code == 200 and isinstance(payload, dict):
        rec["response_id"] = payload.get("id")
        rec["completion"], rec["finish_reason"] = _texts(kind, payload.get("choices"))
        _usage(rec, payload.get("usage"))
        done(200)
    else:
        done(answer.status_code, _upstream_error(payload if payload is not None else answer.text))
    return Response(answer.content, status_code=answer.status_code, headers=_copied(answer.headers))


async def _stream(proxy: Proxy, url: str, body: dict[str, Any], kind: str, rec: dict[str, Any],
                  done: Callable[..., None]) -> Response:
    """Relay the upstream's server-sent events as they arrive, reading the text, id and usage
    out of them; the record is made before `[DONE]` goes out, so feedback sent right after the
    stream finds it."""
    client = proxy.http()
    req = client.build_request("POST", url, json=body, headers=proxy._headers())
    try:
        answer = await client.send(req, stream=True)
    except httpx.HTTPError as exc:
        err = proxy._unreachable(exc)
        done(err.status, err.message)
        return _error(err)
    if answer.status_code != 200:  # an error before any event: pass it through as it is
        content = await answer.aread()
        await answer.aclose()
        try:
            message = _upstream_error(json.loads(content))
        except ValueError:
            message = content.decode("utf-8", "replace")[:1000]
        done(answer.status_code, message)
        return Response(content, status_code=answer.status_code, headers=_copied(answer.headers))

    async def relay() -> AsyncIterator[bytes]:
        texts: dict[int, list[str]] = {}
        reasons: dict[int, Any] = {}
        finished = False
        pending = b""
        try:
            async for chunk in answer.aiter_bytes():
                pending += chunk
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    if _read_event(event, rec, kind, texts, reasons):
                        finished = True
                        rec["completion"] = ["".join(texts[i]) for i in sorted(texts)]
                        rec["finish_reason"] = [reasons.get(i) for i in sorted(texts)]
                        done(200)
                    yield event + b"\n\n"
            if pending.strip():
                yield pending
        except httpx.HTTPError as exc:
            if not finished:
                rec["completion"] = ["".join(texts[i]) for i in sorted(texts)]
                done(502, f"the {proxy.engine} stream broke off: {type(exc).__name__}: {exc}")
                finished = True
        finally:
            await answer.aclose()
            if not finished:  # the client went away, or the upstream ended without [DONE]
                rec["completion"] = ["".join(texts[i]) for i in sorted(texts)]
                done(200, "stream ended before [DONE]")

    headers = _copied(answer.headers)
    headers.setdefault("cache-control", "no-cache")
    return StreamingResponse(relay(), status_code=200, headers=headers,
                             media_type=answer.headers.get("content-type", "text/event-stream"))


def _read_event(event: bytes, rec: dict[str, Any], kind: str, texts: dict[int, list[str]],
                reasons: dict[int, Any]) -> bool:
    """Take one SSE event's facts into the record; True at `data: [DONE]`."""
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return True
        try:
            chunk = json.loads(data)
        except ValueError:
            continue
        if not isinstance(chunk, dict):
            continue
        rec.setdefault("response_id", chunk.get("id"))
        if chunk.get("usage"):
            _usage(rec, chunk["usage"])
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            i = int(choice.get("index") or 0)
            piece = (choice.get("delta") or {}).get("content") if kind == "chat" else choice.get("text")
            texts.setdefault(i, []).append(str(piece or ""))
            if choice.get("finish_reason") is not None:
                reasons[i] = choice["finish_reason"]
    return False


async def feedback(request: Request) -> Response:
    proxy: Proxy = request.app.state.proxy
    try:
        proxy.check_auth(request)
        if proxy.feedback is None:
            raise RequestError(404, "Feedback is not enabled on this server: it needs a request store. Add a "
                               "`monitors:` entry for this deployment in llmops.yaml and apply it.", None,
                               "feedback_disabled")
        payload = await _read_json(request)
        from llmops.monitor.errors import FeedbackError

        addr = request.client.host if request.client else ""
        try:
            request_id = proxy.feedback(payload, client_id(request.headers, addr, _bearer(request)))
        except FeedbackError as exc:
            unknown = exc.status == 404
            raise RequestError(exc.status, exc.message, "request_id" if unknown else None,
                               "request_not_found" if unknown else "invalid_feedback") from None
    except RequestError as exc:
        return _error(exc)
    return JSONResponse({"status": "recorded", "request_id": request_id})


async def not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    if status == 405:
        return _error(RequestError(405, f"Method {request.method[:20]} is not allowed on {request.url.path}.",
                                   None, "method_not_allowed"))
    return _error(RequestError(404, f"Unknown request URL: {request.method} {request.url.path[:200]}. Please check "
                               "the URL for typos.", None, "unknown_url"))


def make_app(proxy: Proxy) -> Starlette:
    """The proxy as an ASGI app (run it with uvicorn)."""
    routes = [Route("/health", health, methods=["GET"]), Route("/v1/models", models, methods=["GET"]),
              Route("/v1/completions", generate, methods=["POST"]),
              Route("/v1/chat/completions", generate, methods=["POST"]),
              Route("/v1/feedback", feedback, methods=["POST"])]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await proxy.close()

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)
    app.state.proxy = proxy
    return app


# -- command line ---------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llmops.serve.proxy",
                                description="Logging proxy in front of an OpenAI-compatible server")
    p.add_argument("--upstream", required=True, help="base URL of the OpenAI-compatible server (no /v1)")
    p.add_argument("--upstream-key-env", default=UPSTREAM_KEY_ENV,
                   help="environment variable holding the key sent to the upstream (default %(default)s)")
    p.add_argument("--engine", default="vllm", help="what the upstream is, for /health and messages")
    p.add_argument("--upstream-timeout", type=float, default=UPSTREAM_TIMEOUT_S, metavar="SECONDS")
    p.add_argument("--model-name", required=True)
    p.add_argument("--model-dir", help="what the upstream serves (recorded, not read)")
    p.add_argument("--adapter-dir", help="the adapter the upstream serves (recorded, not read)")
    p.add_argument("--served-file", type=Path, help="the deployment's JSON: version, alias, adapter sha256")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--auth-token-env", help="name of the environment variable holding the bearer token")
    p.add_argument("--request-log", type=Path, help="append one JSON line per request to this file")
    store = p.add_mutually_exclusive_group()
    store.add_argument("--monitor-store", metavar="URL")
    store.add_argument("--monitor-store-env", metavar="VAR")
    p.add_argument("--log-text", action="store_true")
    return p.parse_args(argv)


def _served(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    keys = ("deployment", "version", "alias", "adapter_sha256")
    return {k: doc[k] for k in keys if isinstance(doc, dict) and doc.get(k) is not None}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m llmops.serve.proxy`: serve until SIGTERM/SIGINT."""
    import uvicorn

    from llmops.serve.main import JsonlRequestLog, fan_out, feedback_hook

    args = _parse_args(argv)
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731

    def error(message: str) -> int:
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2

    token = None
    if args.auth_token_env:
        token = os.environ.get(args.auth_token_env, "")
        if not token:
            return error(f"--auth-token-env names {args.auth_token_env}, but that environment variable is empty "
                         "or not set; set it or drop --auth-token-env")
    url = args.monitor_store
    if args.monitor_store_env:
        url = os.environ.get(args.monitor_store_env, "")
        if not url:
            return error(f"--monitor-store-env names {args.monitor_store_env}, but that environment variable is "
                         "empty or not set")
    store = None
    if url:
        from llmops.errors import LlmopsError
        from llmops.monitor.store import open_store

        try:
            store = open_store(url, log_text=args.log_text, on_error=lambda m: log(f"request store: {m}"))
        except LlmopsError as exc:
            return error(exc.message)
    hooks: list[OnRequest] = [JsonlRequestLog(args.request_log, args.log_text)] if args.request_log else []
    if store is not None:
        hooks.append(store)
    proxy = Proxy(args.upstream, args.model_name, upstream_key=os.environ.get(args.upstream_key_env),
                  auth_token=token, on_request=fan_out(hooks), served=_served(args.served_file),
                  feedback=feedback_hook(store) if store is not None else None, engine=args.engine,
                  timeout=args.upstream_timeout, log=log)
    app = make_app(proxy)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=10, lifespan="on")
    logging_to = f", logging requests to {store.describe()}" if store is not None else ""
    log(f"proxying {args.model_name} on http://{args.host}:{args.port} to {args.engine} at {args.upstream} "
        f"(auth {'on' if token else 'off'}{logging_to})")
    try:
        uvicorn.Server(config).run()  # handles SIGTERM/SIGINT: stops accepting, finishes in-flight requests
    finally:
        if store is not None:
            store.close()  # stores what is queued: SIGTERM loses no answered request
    return 0


if __name__ == "__main__":
    sys.exit(main())
