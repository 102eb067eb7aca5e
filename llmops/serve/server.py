"""The OpenAI-compatible model server: one model loaded once, generation under a lock.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
server-sent events), GET /v1/models, GET /health. Every refused request gets an OpenAI error
body and a 4xx status; unexpected failures get a 500 error body, never a dropped connection.
`on_request(record)` is called once per request (after the answer is sent) with a flat
dict of facts (see `_record`); it is the hook request logging and monitoring plug into.

Run it as `python -m llmops.serve --model-dir D --port P --model-name NAME`.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

from llmops.serve import openai_api as api
from llmops.serve.openai_api import GenerationRequest, RequestError

MAX_BODY_BYTES = 4 * 1024 * 1024
OnRequest = Callable[[dict[str, Any]], None]


@dataclass
class Outcome:
    """What one generation request produced, for the response and the request record."""

    texts: list[tuple[str, str]]  # (text, finish_reason) per choice
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict[str, Any] | None] = field(default_factory=list)


class ModelService:
    """The loaded model behind the HTTP layer; every model/tokenizer call holds `lock`."""

    def __init__(self, lm: Any, max_tokens_limit: int = 1024, default_chat_max_tokens: int = 256) -> None:
        self.lm = lm
        self.lock = threading.Lock()
        self.max_tokens_limit = max_tokens_limit
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
            self._seed(req)
            wanted = max(budgets)
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
    created: int = field(default_factory=lambda: int(time.time()))
    log: Callable[[str], None] = lambda line: None


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
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"id": uuid.uuid4().hex, "time": time.time(), "method": method,
                               "path": self.path.split("?", 1)[0], "client": self.client_address[0],
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

    def _route(self, method: str, rec: dict[str, Any]) -> None:
        path = rec["path"]
        routes = {("GET", "/health"): self._health, ("GET", "/v1/models"): self._models,
                  ("POST", "/v1/completions"): self._completions, ("POST", "/v1/chat/completions"): self._chat}
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

    def _check_auth(self) -> None:
        token = self.app.auth_token
        if not token:
            return
        header = self.headers.get("Authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
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
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise RequestError(400, "We could not parse the JSON body of your request. The body must be valid "
                               "JSON (Content-Type: application/json).", None) from None

    def _health(self, body: bytes, rec: dict[str, Any]) -> None:
        self._send_json(200, {"status": "ok", "model": self.app.model_name}, rec)

    def _models(self, body: bytes, rec: dict[str, Any]) -> None:
        self._send_json(200, api.models_response(self.app.model_name, self.app.created), rec)

    def _completions(self, body: bytes, rec: dict[str, Any]) -> None:
        svc = self.app.service
        req = api.parse_completion_request(self._json(body), self.app.model_name, svc.max_tokens_limit)
        self._generate(req, rec)

    def _chat(self, body: bytes, rec: dict[str, Any]) -> None:
        svc = self.app.service
        req = api.parse_chat_request(self._json(body), self.app.model_name, svc.max_tokens_limit)
        self._generate(req, rec)

    def _generate(self, req: GenerationRequest, rec: dict[str, Any]) -> None:
        rec["stream"] = req.stream
        rec["prompt"] = req.prompts if req.kind == "completion" else req.messages
        rid = api.new_id(req.kind)
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
                on_request: OnRequest | None = None, log: Callable[[str], None] | None = None) -> ModelServer:
    """Bind (port 0 picks a free one: read `server.server_address`); call `serve_forever()`."""
    app = App(service, model_name, auth_token or None, on_request)
    if log is not None:
        app.log = log
    return ModelServer((host, port), app)


class JsonlRequestLog:
    """An `on_request` hook appending one JSON line per request; texts only with `log_text`."""

    TEXT_FIELDS = ("prompt", "completion")

    def __init__(self, path: Path | str, log_text: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log_text = log_text
        self._lock = threading.Lock()

    def __call__(self, record: dict[str, Any]) -> None:
        rec = record if self.log_text else {k: v for k, v in record.items() if k not in self.TEXT_FIELDS}
        line = json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llmops.serve", description="OpenAI-compatible model server")
    p.add_argument("--model-dir", required=True, type=Path)
    p.add_argument("--adapter-dir", type=Path)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model-name", required=True)
    p.add_argument("--auth-token-env", help="name of the environment variable holding the bearer token")
    p.add_argument("--max-tokens-limit", type=int, default=1024)
    p.add_argument("--request-log", type=Path, help="append one JSON line per request to this file")
    p.add_argument("--log-text", action="store_true", help="include prompts and completions in --request-log")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m llmops.serve`: load the model, serve until SIGTERM/SIGINT."""
    import signal

    args = _parse_args(argv)
    token = None
    if args.auth_token_env:
        token = os.environ.get(args.auth_token_env, "")
        if not token:
            print(f"error: --auth-token-env names {args.auth_token_env}, but that environment variable is "
                  "empty or not set; set it or drop --auth-token-env", file=sys.stderr)
            return 2
    from llmops.errors import LlmopsError
    from llmops.serve.model import load_model

    try:
        lm = load_model(args.model_dir, args.adapter_dir, args.device)
    except LlmopsError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    hook = JsonlRequestLog(args.request_log, args.log_text) if args.request_log else None
    server = make_server(ModelService(lm, args.max_tokens_limit), args.host, args.port, args.model_name, token, hook,
                         log=lambda line: print(line, file=sys.stderr, flush=True))
    host, port = server.server_address[:2]
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"serving {args.model_name} on http://{host}:{port} (auth {'on' if token else 'off'})",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
